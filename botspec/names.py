"""A bot's name, as the spec declares it: stdlib only, so that what must not import
msgspec (circusd's process, where the keeper checks every name it is given) can."""

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
