"""What a person reads about a build: report.html, the dataset card, `pairforge show`, and the hard negatives'
blind-bias report. Reads only a build's files."""
