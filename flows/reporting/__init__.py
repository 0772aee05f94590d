"""The build report, the dataset card and `pairforge show`."""
