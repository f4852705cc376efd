"""README says what the code enforces: its spec table is the generated one, and its
API table names exactly the operations of the route table."""

from __future__ import annotations

import re
from pathlib import Path

from botspec.reference import BEGIN, END, markdown_table
from controller.api import ROUTES, openapi_document

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_readme_spec_table_is_the_generated_one() -> None:
    start, stop = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:stop] + "\n" == markdown_table(), "run: python -m botspec"


def test_readme_api_table_names_every_operation_and_no_other() -> None:
    section = README[README.index("| method and path | what |") :].split("\n\n", 1)[0]
    documented: set[tuple[str, str]] = set()
    for cell in re.findall(r"^\| (.+?) \|", section, re.M)[1:]:
        # `GET /a`, `/b` (same method, sibling path); `GET`, `PUT /c` (two methods, one path)
        pending: list[str] = []
        method, base = "", ""
        for item in re.findall(r"`([^`]+)`", cell):
            words = item.split()
            if len(words) == 1 and words[0].isupper():
                pending.append(words[0])
                continue
            if len(words) == 2:
                method, path = words
                base = path
            else:
                path = (
                    words[0]
                    if words[0].startswith(("/api", "/openapi"))
                    else (base.rsplit("/", 1)[0] + words[0])
                )
            for each in [*pending, method]:
                documented.add((each, path.split("?")[0]))
            pending = []
    routes = {(route.method, route.path) for route in ROUTES}
    assert routes - documented == set(), "README lacks these operations"
    assert {r for r in documented if r[1].startswith("/api")} - routes == set(), (
        "README names operations that do not exist"
    )


def test_every_route_is_in_the_openapi_document() -> None:
    for route in ROUTES:
        assert route.method.lower() in openapi_document()["paths"][route.path]
