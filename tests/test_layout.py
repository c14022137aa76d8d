"""The package's layout, as the README's "Architecture" section states it: folders
on floors, each importing only from the floors below it (lazy imports inside
functions included), command-line code only in `mmjax/commands/` and
`mmjax/cli.py`, and no module over 600 lines."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmjax")

# Bottom to top, as in the README; a room is a folder of mmjax/ or a top-level module.
FLOORS = [
    {"errors"},
    {"paths"},
    {"workdir", "models", "losses", "data"},
    {"families", "convert"},
    {"config", "registry"},
    {"evaluate"},
    {"train"},
    {"perf"},
    {"commands"},
    {"cli"},
]
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)
                yield path, rel.split(os.sep)[0].removesuffix(".py")


def _imports(path):
    """Every `mmjax.X...` module a file imports (at the top or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mmjax":
                yield from (f"mmjax.{a.name}" for a in node.names)
            elif node.module.startswith("mmjax."):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mmjax."))


def test_every_room_has_a_floor():
    rooms = {room for _, room in _modules()} - {"__init__"}
    assert rooms == set(FLOOR), rooms ^ set(FLOOR)


def test_imports_run_down_only():
    upward = []
    for path, room in _modules():
        if room == "__init__":
            continue
        for module in _imports(path):
            target = module.split(".")[1]
            if target != room and FLOOR[target] >= FLOOR[room]:
                upward.append(f"{os.path.relpath(path, ROOT)} imports {module}")
    assert not upward, "\n".join(upward)


def test_command_line_code_lives_in_commands_and_cli():
    outside = [os.path.relpath(path, ROOT) for path, room in _modules()
               if room not in ("commands", "cli")
               and any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                       "argparse" in ([a.name for a in n.names] if isinstance(n, ast.Import)
                                      else [n.module])
                       for n in ast.walk(ast.parse(open(path, encoding="utf-8").read())))]
    assert not outside, outside


def test_no_module_over_600_lines():
    sizes = {os.path.relpath(p, ROOT): sum(1 for _ in open(p, encoding="utf-8"))
             for p, _ in _modules()}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
