"""The command line as documented: top-level help, each command's help, README examples."""
from __future__ import annotations

import os
import re
import shlex
from importlib import metadata

import pytest

from _helpers import ROOT
from mmjax import cli


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _help(sub, capsys) -> str:
    code, out, err = _run([sub, "--help"], capsys)
    assert code == 0, (sub, code, err[-2000:])
    return out


def _options(help_text: str) -> dict[str, str]:
    """argparse help -> {--option: its description} (every spelling of an option)."""
    out, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m:
            names = re.findall(r"(--?[\w-]+)", m.group(1).split("  ")[0])
            current = names
            for n in names:
                out[n] = (m.group(2) or "").strip()
        elif current and line.startswith(" " * 10) and line.strip():
            for n in current:
                out[n] = (out[n] + " " + line.strip()).strip()
        else:
            current = None
    return out


def _listed_commands(capsys) -> list[str]:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    return sorted({ln.split()[1] for ln in out.splitlines()
                   if ln.startswith("    mmjax ") and not ln.split()[1].startswith("-")})


def readme_commands() -> list[tuple[str, list[str]]]:
    """`(subcommand, [--flags])` of every `mmjax ...` command in README.md's bash blocks
    (flags without `--config.*` overrides and without values)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w == "mmjax" and i + 1 < len(words):
                    rest = words[i + 1:]
                    end = next((j for j, x in enumerate(rest) if x in ("&&", ";", "|")),
                               len(rest))
                    rest = rest[:end]
                    flags = [x.split("=", 1)[0] for x in rest[1:]
                             if x.startswith("--") and not x.startswith("--config.")]
                    found.append((rest[0], flags))
    return found


def test_top_level_help_lists_real_commands_and_version(capsys):
    listed = _listed_commands(capsys)
    assert "convert" not in listed
    assert {"train", "eval", "generate", "shards", "bench"} <= set(listed), listed
    for sub in listed:  # every command the help shows exists and has its own help
        assert f"usage: mmjax {sub}" in _help(sub, capsys)
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"mmjax {metadata.version('mmjax')}"


def test_train_help_explains_config_overrides(capsys):
    text = _help("train", capsys)
    assert "--config.KEY=VALUE" in text and "--config.a.b=value" in text
    assert "--config.batch_size=64" in text


@pytest.mark.parametrize("sub", ["train", "eval", "generate", "curate"])
def test_every_option_has_a_description(sub, capsys):
    options = _options(_help(sub, capsys))
    assert "--workdir" in options
    missing = [o for o, desc in options.items() if not desc]
    assert not missing, (sub, missing)


def test_generate_takes_max_new_tokens(tmp_path, capsys):
    text = _help("generate", capsys)
    assert "--max-new-tokens" in text and "--max_new_tokens" not in text
    code, _, err = _run(["generate", "--workdir", str(tmp_path / "none"), "--image", "x.png",
                         "--max-new-tokens", "4"], capsys)
    assert code == 2 and "unrecognized arguments" not in err, err
    assert "none" in err  # it got as far as looking for the run


def test_readme_commands_and_flags_exist(capsys):
    commands = readme_commands()
    subs = sorted({s for s, _ in commands})
    assert {"train", "eval", "shards", "bench", "generate"} <= set(subs), subs
    listed = _listed_commands(capsys)
    for sub in subs:
        assert sub in listed, f"`mmjax {sub}` is in README.md but not in `mmjax --help`"
        text = _help(sub, capsys)
        for flag in sorted({f for s, flags in commands if s == sub for f in flags}):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"README.md uses `mmjax {sub} {flag}`, which `mmjax {sub} --help` lacks"
