"""``python -m botspec``: print README's spec table, generated from the declaration."""

from botspec.reference import markdown_table

print(markdown_table(), end="")
