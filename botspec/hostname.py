"""A controller's host name, as a bot's ``host`` names it: stdlib only, so that what
reads the controller's settings (the CLI, at every command) need not import msgspec."""

#: DNS-label-like, lower case, dots between labels.
FLEET_HOST_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
MAX_FLEET_HOST = 253
