"""The node daemon: watch the images directory and import what lands there."""
