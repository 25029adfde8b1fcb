"""The documentation points only at what exists: every relative link (and its #anchor) and
every repository path in code spans of README.md, CONTRIBUTING.md and docs/*.md; the README
stays short and lists every console script setup.py installs; its Megatron example runs."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 220
# Code spans naming something under these folders must name a file or folder that exists.
REPO_PREFIXES = ("rnope_megatron/", "recipes/", "docs/", "examples/", "tools/", "benchmarks/", "tests/")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def doc_files() -> list[pathlib.Path]:
    return [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (hyphens and
    underscores kept), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def repository_paths(text: str) -> list[str]:
    """Every word of a code span or fenced block that names a repository path."""
    code = [m.group(0) for m in FENCE.finditer(text)]
    code += [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]
    found = []
    for block in code:
        for word in block.split():
            word = word.split("=")[-1].strip("()[]{},;:'\"")
            if word.startswith(REPO_PREFIXES):
                found.append(word)
    return found


def path_exists(word: str) -> bool:
    # `recipes/<scale>/<stage>.yaml`, `tests/test_plan*.py`: at least one file must match.
    pattern = re.sub(r"<[^>]*>", "*", word)
    if any(ch in pattern for ch in "*?["):
        return any(ROOT.glob(pattern))
    return (ROOT / pattern.rstrip("/")).exists()


def broken_references(path: pathlib.Path) -> list[str]:
    """One line per link or path in ``path`` that points at nothing."""
    text = path.read_text(encoding="utf-8")
    broken = []
    prose = CODE_SPAN.sub("", FENCE.sub("", text))  # a link inside code is no link
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{path.name}: link {target} -> no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{path.name}: link {target} -> no heading #{anchor} in {resolved.name}")
    for word in repository_paths(text):
        if not path_exists(word):
            broken.append(f"{path.name}: `{word}` does not exist")
    return broken


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_repository_path_exists(path):
    broken = broken_references(path)
    assert not broken, "\n".join(broken)


def test_a_broken_link_or_path_is_reported(tmp_path):
    """The check is not vacuous: a missing file, a missing anchor and a missing path in a
    code span are each reported; external links and existing targets are not."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other\n\n## A section\n")
    page = docs / "page.md"
    page.write_text(
        "[ok](other.md#a-section) [web](https://example.com/x.md) [top](#page)\n"
        "# Page\n\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-section)\n"
        "`rnope_megatron/no_such_module.py` and `rnope_megatron/model/pattern.py`\n"
        "```bash\nrnope-train recipes/no-such-recipe.yaml\n```\n")
    assert broken_references(page) == [
        "page.md: link missing.md -> no such file",
        "page.md: link other.md#no-such-section -> no heading #no-such-section in other.md",
        "page.md: `recipes/no-such-recipe.yaml` does not exist",
        "page.md: `rnope_megatron/no_such_module.py` does not exist",
    ]


def test_slugs_follow_githubs_anchor_rules():
    assert slug("The paper's claim, small") == "the-papers-claim-small"
    assert slug("Training: `rnope-train`") == "training-rnope-train"
    assert slug("Measured: `benchmarks/context_parallel.py`") == "measured-benchmarkscontext_parallelpy"


def test_the_readme_stays_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into a manual in docs/"


def console_scripts() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return [ast.literal_eval(item).split("=")[0].strip() for item in value.elts]
    raise AssertionError("setup.py has no console_scripts entry point")


def test_the_readme_table_lists_every_console_script():
    scripts = console_scripts()
    assert len(scripts) >= 6
    rows = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `rnope-")]
    listed = {re.match(r"\| `([^`]+)`", row).group(1) for row in rows}
    assert set(scripts) <= listed, f"console scripts missing from README's table: {sorted(set(scripts) - listed)}"
    for row in rows:
        assert "](docs/" in row, f"README table row without a link to its manual: {row}"


def test_setup_reads_the_readme_as_long_description():
    result = subprocess.run([sys.executable, "setup.py", "--long-description"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == README.read_text(encoding="utf-8").strip()


@pytest.mark.cli
def test_the_readmes_megatron_example_runs(tmp_path):
    """The README's first Python block, run as a user pastes it (a fresh interpreter, one
    process, CPU); the others (the cluster version: TE, process groups) must compile."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert blocks
    for block in blocks[1:]:
        compile(block, "README.md", "exec")
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0] + "\nassert logits.shape == (1, 512, 256), logits.shape\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    layers = [line.split() for line in result.stdout.splitlines() if line.startswith("layer ")]
    assert [row[2] for row in layers] == list("SSSGSSSG")
    assert [row[-1] for row in layers] == ["RoPE", "RoPE", "RoPE", "NoPE"] * 2
