"""The package's shape and its command line: no import cycles, a torch-only attention core, every
subcommand's --help and every flag, the Auto classes, and the bugs the layout change fixed."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from infoscale.attn.methods import REGISTRY
from infoscale.cli import COMMANDS, build_parser
from infoscale.cli import main as cli
from infoscale.errors import ConfigError, MethodError

PKG = Path(__file__).resolve().parents[1] / "src" / "infoscale"
STDLIB = set(sys.stdlib_module_names)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import in the file, relative ones made absolute."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if node.module is None:  # from . import x, y: each is a module
                out += [(f"{name}.{a.name}", id(node) in top) for a in node.names]
            else:
                out.append((name, id(node) in top))
    return out


def _internal_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp, _ in _imports(path):
            if imp.startswith("infoscale"):
                while imp not in modules and "." in imp:  # `from .x import name`: the module is x
                    imp = imp.rsplit(".", 1)[0]
                if imp in modules and imp != name:
                    deps.add(imp)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    """Every import inside the package (also the ones inside functions) goes one way."""
    graph = _internal_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + ".") or (m == "infoscale"):  # a package importing its own children
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(d) is None:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


def test_attention_core_imports_only_torch_and_the_standard_library():
    for path in (PKG / "attn").rglob("*.py"):
        for imp, _ in _imports(path):
            root = imp.split(".")[0]
            assert root in STDLIB or root == "torch" or imp.startswith("infoscale.attn"), (path.name, imp)


# infoscale.hf: one concern per module. Each module's imports from the rest of the package, at module level or inside
# a function: a module that needs more than its row says has taken on another module's concern.
HF_IMPORTS = {
    "methods": {"attn", "attn.methods", "errors"},
    "mask": {"attn.plan", "hf.methods"},
    "geometry": {"errors", "hf.mask"},
    "capture": {"attn", "hf.geometry"},
    "rotary": {"attn.rope", "errors", "hf.methods"},
    "sink_cache": {"errors"},
    "rotated_cache": set(),
    "cache": {"errors", "hf.geometry", "hf.mask", "hf.methods", "hf.rotated_cache", "hf.sink_cache"},
    "attention": {"attn", "attn.plan", "attn.sdpa", "errors", "hf.capture", "hf.geometry", "hf.methods", "hf.rotary",
                  "hf.rotated_cache", "hf.sink_cache"},
    "versions": set(),
    "patch": {"attn", "errors", "models", "hf.attention", "hf.cache", "hf.mask", "hf.methods", "hf.rotary",
              "hf.versions"},
    "calibration": {"attn", "calfit", "errors", "models", "hf.capture", "hf.patch"},
}
HF_MAX_LINES = 350


def test_hf_modules_import_only_their_concern():
    graph = _internal_graph()
    modules = {p.stem for p in (PKG / "hf").glob("*.py")} - {"__init__"}
    assert modules == set(HF_IMPORTS), "a module was added to or removed from infoscale.hf: update HF_IMPORTS"
    for name, allowed in HF_IMPORTS.items():
        got = {d.removeprefix("infoscale.") for d in graph[f"infoscale.hf.{name}"]}
        assert got == allowed, (name, sorted(got ^ allowed))


def test_hf_modules_are_short():
    for path in (PKG / "hf").glob("*.py"):
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n <= HF_MAX_LINES, f"infoscale/hf/{path.name} has {n} lines (at most {HF_MAX_LINES}): split its concern"


def test_hf_keeps_its_names_importable():
    """The public API, and the names infoscale doctor and the tests take from infoscale.hf."""
    import infoscale.hf as hf

    assert hf.__all__ == ["NAME", "apply", "remove", "calibrate", "capture_attention", "cache_kwarg",
                          "infoscale_attention", "infoscale_mask", "train_len_of", "SinkCache", "bounded_cache",
                          "RotatedKeysCache", "cache_for"]
    for name in [*hf.__all__, "TESTED_TRANSFORMERS", "newer_than_tested", "CACHE_KWARGS", "_cache_in", "_mask_params",
                 "_parsed", "_pre_hook", "_set_attn_implementation", "_warn_if_untested"]:
        assert hasattr(hf, name), name


def test_one_definition_of_the_query_offset_and_the_window():
    """Where the queries sit when transformers skipped the mask is :func:`infoscale.hf.geometry.query_offset`, and
    the window-with-sinks predicate is :func:`infoscale.attn.plan.in_window`; no other module writes either."""
    for path in sorted(PKG.rglob("*.py")):
        src = path.read_text(encoding="utf-8")
        rel = path.relative_to(PKG).as_posix()
        if rel != "hf/geometry.py":
            assert "1 < n_q < n_k" not in src, rel
        if rel != "attn/plan.py":
            assert "<sinks)|(" not in src.replace(" ", ""), rel


def test_a_capture_leaves_nothing_behind_when_it_raises():
    from infoscale.hf import capture

    with pytest.raises(RuntimeError), capture.capturing(rows=lambda n: None) as layers:
        assert capture.current() is not None and layers == {}
        raise RuntimeError("inside")
    assert capture.current() is None


# Comparisons with a method's name outside the attention core that are not about methods: (file, source)
NOT_METHOD_NAMES = {
    ("patch.py", 'getattr(model.config, "model_type", "") in ("llama4", "llama4_text")'),  # a model type (Llama 4)
}


def _string_constants(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for e in node.elts for v in _string_constants(e)]
    return []


def _name_comparisons(src: str, names: set[str]):
    """(comparison node, the names it compares with) for each ==, !=, in, not in, match case in ``src`` that has a
    string constant among ``names``."""
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Compare):
            values = [v for n in [node.left, *node.comparators] for v in _string_constants(n)]
        elif isinstance(node, ast.MatchValue):
            values = _string_constants(node.value)
        else:
            continue
        if names.intersection(values):
            yield node, sorted(names.intersection(values))


def test_only_the_attention_core_branches_on_method_names():
    """Every fact about a method lives in its registry entry (infoscale.attn.methods.REGISTRY): outside
    infoscale.attn no code compares a value with a method's name, so a new method is one entry and no other module
    needs to learn its name."""
    from infoscale.attn.methods import REGISTRY

    found = []
    for path in sorted(PKG.rglob("*.py")):
        if (PKG / "attn") in path.parents:
            continue
        src = path.read_text(encoding="utf-8")
        for node, hit in _name_comparisons(src, set(REGISTRY)):
            seg = ast.get_source_segment(src, node)
            if (path.name, seg) not in NOT_METHOD_NAMES:
                found.append(f"{path.relative_to(PKG)}:{node.lineno}: {seg} ({', '.join(hit)})")
    assert not found, "ask the method's registry entry instead of its name:\n" + "\n".join(found)


def test_the_method_name_check_sees_every_form():
    """The check above finds ==, !=, in (a tuple) and match; a name in a message is no comparison."""
    src = """
if c.name == "window": pass
if "rerope" != x: pass
if name in ("lm_infinite", "streamingllm"): pass
match kind:
    case "logn": pass
print("infoscale")
"""
    names = {"window", "rerope", "lm_infinite", "streamingllm", "logn", "infoscale"}
    hits = sorted(n for _, hit in _name_comparisons(src, names) for n in hit)
    assert hits == ["lm_infinite", "logn", "rerope", "streamingllm", "window"]



# Comparisons with a family's name outside models/ and tasks/ that are the point of their module: (file, source)
FAMILY_NAME_EXEMPT = {
    # the converter of GAU-α's official checkpoints checks that the file it is handed is one
    ("convert.py", 'cfg.get("model_type", "gau_alpha") != "gau_alpha"'),
}


def test_only_models_and_tasks_branch_on_family_and_task_names():
    """A family's facts live in its ``Family`` entry and module, a task's in its ``Task`` class: outside
    infoscale.models and infoscale.tasks no code compares a value with a family's ``model_type``, its ``--arch``
    name or a task's name, so a new family or task is its module and one registry line."""
    from infoscale.models import FAMILIES
    from infoscale.tasks import TASKS

    names = set(FAMILIES) | {f.arch for f in FAMILIES.values() if f.arch} | set(TASKS)
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if (PKG / "models") in path.parents or (PKG / "tasks") in path.parents:
            continue
        src = path.read_text(encoding="utf-8")
        for node, hit in _name_comparisons(src, names):
            seg = ast.get_source_segment(src, node)
            if (path.name, seg) not in FAMILY_NAME_EXEMPT:
                found.append(f"{path.relative_to(PKG)}:{node.lineno}: {seg} ({', '.join(hit)})")
    assert not found, "ask the family's entry or the task's class instead of its name:\n" + "\n".join(found)


def test_every_family_names_a_registered_task_and_trainable_families_build():
    """Each family's task is in the task registry, implements the interface, and each family ``infoscale train``
    builds has the module facts it promises (``PRESETS``, ``TRAIN_METHODS``, ``build_for_training``)."""
    from infoscale.models import ARCHS, FAMILIES
    from infoscale.tasks import Task, task

    for fam in FAMILIES.values():
        cls = task(fam.task)
        assert issubclass(cls, Task) and isinstance(cls.causal, bool) and cls.streams >= 1 and cls.metrics
        for name in ("batch", "forward", "targets", "step_metrics", "heldout"):
            assert getattr(cls, name) is not getattr(Task, name), f"{cls.__name__} does not implement {name}"
    from infoscale.tasks.metrics import METRICS

    # the report knows exactly the metrics the tasks declare (it ranks and formats records by them)
    assert {m.name for f in FAMILIES.values() for m in task(f.task).metrics} == set(METRICS)
    for arch, fam in ARCHS.items():
        module = fam.import_module()
        assert module.PRESETS and callable(module.build_for_training), arch
        assert module.TRAIN_METHODS is None or set(module.TRAIN_METHODS) <= set(REGISTRY) | {"softmax"}, arch
        assert fam.tokenizers and set(fam.tokenizers) <= {"char", "bpe"}, arch

@pytest.mark.e2e
def test_report_loads_no_torch():
    """`infoscale report` only reads records: it must not pull in torch or transformers."""
    import subprocess

    code = "import sys, infoscale.report; print('torch' in sys.modules, 'transformers' in sys.modules)"
    # infoscale/__init__ imports the core (torch); the report module itself must not need more
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[1] == "False"
    for f in (PKG / "report").glob("*.py"):
        for imp, _ in _imports(f):
            assert imp.split(".")[0] not in ("torch", "transformers"), (f.name, imp)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["methods", *COMMANDS])
def test_every_subcommand_help_works(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli([command, "--help"])
    assert e.value.code == 0
    assert "usage: infoscale " + command in capsys.readouterr().out


@pytest.mark.e2e
def test_python_dash_m_runs_the_command_line():
    res = subprocess.run([sys.executable, "-m", "infoscale", "methods"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "infoscale" in res.stdout and "rerope" in res.stdout


def _value_for(action: argparse.Action) -> list[str]:
    """A typed, non-default value for a flag, as text."""
    conv = action.type
    name = getattr(conv, "__name__", "str")
    default = action.default
    first = default[0] if isinstance(default, list) and default else default
    if name == "int":
        return ["7"] if first != 7 else ["9"]
    if name == "float":
        return ["0.25"] if first != 0.25 else ["0.5"]
    return ["xyz"]


def test_every_flag_parses_a_typed_non_default_value():
    """Flags come from the option dataclasses' real type hints: list[float] gives floats, int | None
    accepts none, a bool flag has its --no- form."""
    from infoscale import analysis, evaluate, reproduce, train

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    configs = {"train": train.TrainConfig, "eval": evaluate.EvalConfig, "analyze": analysis.AnalyzeConfig,
               "reproduce": reproduce.ReproduceConfig}
    for command, cls in configs.items():
        sp = sub.choices[command]
        hints = typing.get_type_hints(cls)
        for action in sp._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = action.option_strings[0]
            required = {"eval": ["--models", "m"], "train": ["--out", "o"]}.get(command, [])  # the required flags
            if isinstance(action, argparse.BooleanOptionalAction):
                ns = sp.parse_args(["--no-" + flag[2:]] + required)
                assert getattr(ns, action.dest) is False
                continue
            value = _value_for(action)
            extra = required if flag not in required else []
            ns = sp.parse_args([flag, *value, *extra])
            got = getattr(ns, action.dest)
            want = hints[action.dest]
            origin = typing.get_origin(want)
            if origin in (list, tuple):
                (inner,) = set(typing.get_args(want)) - {Ellipsis}
                assert isinstance(got, list) and all(isinstance(x, inner) for x in got), (command, flag, got)
            else:
                inner = [a for a in typing.get_args(want) if a is not type(None)] or [want]
                assert isinstance(got, inner[0]), (command, flag, got)
            assert got != action.default, (command, flag)


def test_analyze_scales_are_floats():
    """Once a crash: list[float] flags arrived as strings."""
    parser = build_parser()
    ns = parser.parse_args(["analyze", "--scales", "4", "8"])
    assert ns.scales == [4.0, 8.0] and all(isinstance(x, float) for x in ns.scales)


def test_bad_preset_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", "--out", str(out), "--preset", "huge"]) == 2
    assert "unknown --preset 'huge'" in capsys.readouterr().err
    assert not out.exists()


def test_configs_validate_their_fields():
    from infoscale.models.gau import GAUConfig

    with pytest.raises(ConfigError, match="cosscale_init"):
        GAUConfig(cosscale_init="banana")
    with pytest.raises(MethodError, match="unknown method 'nosuch'"):
        GAUConfig(eval_attention="nosuch")
    with pytest.raises(MethodError, match="s must be a positive"):
        GAUConfig(attention="cosscale(s=-1)")


# ---------------------------------------------------------------------------------------------
# the transformers contract of GAU-α
# ---------------------------------------------------------------------------------------------


def test_auto_classes_and_fill_mask_pipeline(tiny_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    import infoscale.models.gau  # noqa: F401 - registers the Auto classes

    model = AutoModelForMaskedLM.from_pretrained(tiny_run).eval()
    assert type(model).__name__ == "GAUForMaskedLM"
    tok = AutoTokenizer.from_pretrained(tiny_run)
    fill = pipeline("fill-mask", model=model, tokenizer=tok, top_k=3)
    text = "To be or not to [MASK] ."
    got = fill(text)
    assert len(got) == 3
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    pos = int((ids[0] == tok.mask_token_id).nonzero())
    probs = logits[0, pos].softmax(-1)
    top = probs.topk(3)
    assert [g["token"] for g in got] == top.indices.tolist()
    assert got[0]["score"] == pytest.approx(float(top.values[0]), rel=1e-4)


def test_per_call_method_leaves_no_state(tiny_run):
    from infoscale.rundir import load_run

    model = load_run(tiny_run).model
    x = torch.randint(5, 20, (1, 100))
    before = model(x).logits
    with_info = model(x, method="infoscale").logits
    assert not torch.equal(before, with_info)
    assert torch.equal(model(x).logits, before)  # nothing left behind
    with pytest.raises(MethodError):
        model(x, method="cosscale")
    assert torch.equal(model(x).logits, before)


def test_runs_of_the_first_format_still_load(tmp_path):
    """A run saved with infoscale 0.1's flat parameter names (word_embeddings, layers.N.gau...) loads."""
    from safetensors.torch import load_file, save_file

    from infoscale.models.gau import GAUForMaskedLM, build_config

    torch.manual_seed(0)
    model = GAUForMaskedLM(build_config("tiny", vocab_size=30, train_len=16)).eval()
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    old = {k.replace("gau_alpha.embeddings.", "").replace("gau_alpha.encoder.layer.", "layers."): v
           for k, v in sd.items()}
    assert "layers.0.gau.i_dense.weight" in old and "word_embeddings.weight" in old
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = GAUForMaskedLM.from_pretrained(tmp_path).eval()
    x = torch.randint(5, 30, (1, 20))
    assert torch.equal(loaded(x).logits, model(x).logits)


# The layers of the package (docs/architecture.md): the foundation imports only itself; each content layer imports
# the foundation, itself and what its line names; the stages (train, evaluate, analysis, calibrate, report,
# reproduce, convert, doctor) may import any layer; only the entry points import the command line.
FOUNDATION = {"attn", "errors", "io", "runtime", "options", "stats", "calfit"}
LAYERS = {
    "data": set(),
    "tasks": {"data"},
    "models": {"data", "convert"},  # GAU-α's from_pretrained reads the official checkpoint format through convert
    "hf": {"models", "hf_cache"},
    "hf_cache": set(),
}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "infoscale"


def test_layers_import_only_what_is_below_them():
    bad = []
    for m, deps in _internal_graph().items():
        top = _top(m)
        if top in FOUNDATION:
            allowed = FOUNDATION
        elif top in LAYERS:
            allowed = FOUNDATION | {top} | LAYERS[top]
        else:
            allowed = None  # a stage or an entry point
        for d in deps:
            t = _top(d)
            if t == "cli" and top not in ("cli", "__main__"):
                bad.append(f"{m} imports the command line ({d})")
            elif allowed is not None and t not in allowed:
                bad.append(f"{m} ({top}) imports {d} ({t})")
    assert not bad, "\n".join(sorted(bad))
