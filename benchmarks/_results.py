"""The one place that writes a benchmark's section of benchmarks/RESULTS.md."""

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(name, section, path=RESULTS):
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->``.

    A file without those markers gets the section appended, markers and all;
    a missing file is created with the results heading.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}\n{end}"
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
    else:
        text = "# Benchmark results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as handle:
        handle.write(text)
