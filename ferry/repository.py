"""The model repository: ``<repo>/<model>/config.pbtxt`` + ``<repo>/<model>/<version>/model.onnx``.

Layout and version policy follow Triton: version directories are positive
integers, and ``version_policy`` (latest N by default 1, all, or specific)
chooses which are served.  A request without a version gets the highest
served one.  Every process (gateway, broker, worker) loads the same
repository, so all agree on batch limits and tensor specs without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.errors import ConfigError, NotFound
from ferry.model_config import MODEL_NAME_RE, ModelSettings, load_model_settings, parse_config_text


@dataclass(frozen=True, slots=True, eq=False)  # one instance per version: hash by identity
class ModelVersion:
    name: str
    version: int
    settings: ModelSettings
    model_file: Path

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


class Repository:
    """Immutable view of every served model version."""

    def __init__(self, root: Path, models: dict[str, dict[int, ModelVersion]]) -> None:
        self.root = root
        self._models = models
        self._latest = {name: max(versions) for name, versions in models.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[ModelVersion]:
        return [self._models[name][v] for v in sorted(self._models.get(name, {}))]

    def all_versions(self) -> list[ModelVersion]:
        return [mv for name in self.names for mv in self.versions(name)]

    def get(self, name: str, version: str = "") -> ModelVersion:
        """Resolve a request's model name and (possibly empty) version string."""
        versions = self._models.get(name)
        if versions is None:
            raise NotFound(f"model {name!r} is not in the model repository")
        if not version:
            return versions[self._latest[name]]
        try:
            number = int(version)
        except ValueError:
            raise NotFound(f"model {name!r} has no version {version!r} (versions are integers)") from None
        mv = versions.get(number)
        if mv is None:
            served = ", ".join(str(v) for v in sorted(versions))
            raise NotFound(f"model {name!r} has no served version {number} (served: {served})")
        return mv


def _chosen_versions(model_dir: Path, available: list[int], policy: object) -> list[int]:
    which = policy.WhichOneof("policy_choice")  # type: ignore[attr-defined]
    if which == "all":
        return available
    if which == "specific":
        wanted = sorted(int(v) for v in policy.specific.versions)  # type: ignore[attr-defined]
        missing = [v for v in wanted if v not in available]
        if missing:
            raise ConfigError(
                f"{model_dir / 'config.pbtxt'}: version_policy.specific: versions {missing} "
                f"have no directory with a model file (found: {available})"
            )
        return wanted
    n = policy.latest.num_versions if which == "latest" else 1  # type: ignore[attr-defined]
    if n < 1:
        raise ConfigError(f"{model_dir / 'config.pbtxt'}: version_policy.latest.num_versions must be >= 1")
    return available[-n:]


def load_model(model_dir: Path) -> dict[int, ModelVersion]:
    if not MODEL_NAME_RE.match(model_dir.name):
        raise ConfigError(
            f"{model_dir}: model directory names may use letters, digits, '.', '-' and '_' "
            "and must start with a letter or digit"
        )
    if not (model_dir / "config.pbtxt").is_file():
        raise ConfigError(f"{model_dir}: missing config.pbtxt")
    config = parse_config_text(model_dir / "config.pbtxt")
    filename = config.default_model_filename or "model.onnx"
    if "/" in filename or filename in (".", ".."):
        raise ConfigError(f"{model_dir / 'config.pbtxt'}: default_model_filename must be a plain file name")
    available = sorted(
        int(p.name) for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / filename).is_file()
    )
    if not available:
        raise ConfigError(f"{model_dir}: no version directory (e.g. {model_dir}/1/{filename}) found")
    result: dict[int, ModelVersion] = {}
    for v in _chosen_versions(model_dir, available, config.version_policy):
        settings = load_model_settings(model_dir, model_dir / str(v) / filename)
        result[v] = ModelVersion(model_dir.name, v, settings, model_dir / str(v) / filename)
    return result


def load_repository(root: Path) -> Repository:
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    models: dict[str, dict[int, ModelVersion]] = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            models[child.name] = load_model(child)
    if not models:
        raise ConfigError(f"model repository {root} holds no models (expected <repo>/<model>/config.pbtxt)")
    return Repository(root, models)
