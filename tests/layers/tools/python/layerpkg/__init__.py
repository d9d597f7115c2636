"""A package a layer provides in /opt/python; a later layer replaces VALUE."""
VALUE = "first layer"
