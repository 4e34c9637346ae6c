"""Image archive formats: pure functions over byte streams and JSON documents."""
