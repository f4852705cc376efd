"""The contract between tgfleet's controller and its bot processes, declared once.

- ``botspec.spec``: a bot's spec and the fleet defaults: every field's type,
  default, range and description (msgspec Structs); the API's schemas, the
  controller's validation and the bot's config are all derived from them.
- ``botspec.validate``: checks a JSON value against a declaration and names every
  wrong field at once, in words derived from the declaration.
- ``botspec.config``: the ``config.json`` the controller writes and the bot reads
  (one dump, one parse).
- ``botspec.protocol``: the bus messages; ``botspec.procinfo``: ``/proc`` readings.

Both ``controller`` and ``botrunner`` import this package; neither imports the
other. It depends on the standard library and msgspec only: every bot process
pays for what it imports.
"""
