"""The README's Layout section matches the folders: every path and command it names exists, and
every package of dinov2/ is named in it."""

import ast
import re

import pytest


def _layout_bullets(repo_root) -> list[str]:
    text = (repo_root / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)^## ", text, flags=re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    bullets = re.split(r"^- ", match.group(1), flags=re.M)[1:]
    assert bullets, "the Layout section lists no stages"
    # a bullet ends at the next bullet or at a blank line (the paragraph after the list)
    return [" ".join(b.split("\n\n")[0].split()) for b in bullets]


def _console_scripts(repo_root) -> set[str]:
    tree = ast.parse((repo_root / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return {s.split("=")[0].strip() for s in scripts}
    raise AssertionError("setup.py declares no console scripts")


def test_every_path_and_command_named_in_the_layout_exists(repo_root):
    scripts = _console_scripts(repo_root)
    missing = []
    for bullet in _layout_bullets(repo_root):
        names = re.findall(r"`([^`]+)`", bullet)
        stage = repo_root / names[0]  # each bullet starts with its package
        for name in names:
            if name.startswith("../"):
                continue  # outside the repository (the shared style guide), absent on a clean clone
            if name.startswith("dinov2-"):
                ok = name in scripts
            elif "/" in name:
                ok = (repo_root / name).exists()
            else:  # a bare file name: in the bullet's package or at the repository root
                ok = (stage / name).exists() or (repo_root / name).exists()
            if not ok:
                missing.append(f"{name} (in: {bullet[:60]}...)")
    assert not missing, f"README Layout names what does not exist: {missing}"


def test_every_dinov2_package_is_in_the_layout(repo_root):
    named = {n for b in _layout_bullets(repo_root) for n in re.findall(r"`(dinov2/\w+)`", b)}
    packages = {f"dinov2/{p.name}" for p in (repo_root / "dinov2").iterdir() if (p / "__init__.py").is_file()}
    assert packages - named == set(), "packages missing from the README Layout"


@pytest.mark.parametrize("name", ["dinov2/transfer", "dinov2/eval", "dinov2/data"])
def test_layout_parser_sees_the_known_stages(repo_root, name):
    # Guards the two tests above against a parser that silently finds nothing.
    assert any(b.startswith(f"`{name}`") for b in _layout_bullets(repo_root))
