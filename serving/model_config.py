"""TF Serving's model config (`--model-config-file`, `HandleReloadConfigRequest`) -> ModelSpecs.

The text format of `tensorflow.serving.ModelServerConfig` with a `model_config_list`:

    model_config_list {
      config {
        name: "mtrec"  base_path: "/models/mtrec"  model_platform: "tensorflow"
        model_version_policy { latest { num_versions: 2 } }   # or specific {versions: 1} / all {}
        version_labels { key: "stable" value: 1 }
      }
    }
"""

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.config import ConfigError
from serving.models import ALL, LATEST, SPECIFIC, ModelSpec, VersionPolicy

PLATFORM = "tensorflow"


def read_model_config(path: str) -> list[ModelSpec]:
    """The file's models; ConfigError naming the file and the problem otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(
            f"--model-config-file {path}: cannot read it ({error.strerror})"
        ) from None
    try:
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        raise ConfigError(f"--model-config-file {path}: {error}") from None
    try:
        return specs_from_proto(config)
    except ConfigError as error:
        raise ConfigError(f"--model-config-file {path}: {error}") from None


def specs_from_proto(config: model_server_config_pb2.ModelServerConfig) -> list[ModelSpec]:
    """ModelServerConfig -> ModelSpecs, refusing what this server cannot honour."""
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError("only model_config_list is supported (no custom_model_config)")
    specs, names = [], set()
    for entry in config.model_config_list.config:
        if not entry.name:
            raise ConfigError("a config entry has no name")
        if entry.name in names:
            raise ConfigError(f"model {entry.name!r} is configured twice")
        names.add(entry.name)
        if not entry.base_path:
            raise ConfigError(f"model {entry.name!r} has no base_path")
        if entry.model_platform not in ("", PLATFORM):
            raise ConfigError(
                f"model {entry.name!r}: model_platform {entry.model_platform!r} is not "
                f"supported (only {PLATFORM!r})"
            )
        for label, version in entry.version_labels.items():
            if version <= 0:
                raise ConfigError(f"model {entry.name!r}: label {label!r} -> version {version}")
        specs.append(
            ModelSpec(
                entry.name,
                entry.base_path,
                _policy(entry),
                tuple(sorted(entry.version_labels.items())),
            )
        )
    if not specs:
        raise ConfigError("model_config_list configures no model")
    return specs


def _policy(entry) -> VersionPolicy:
    policy = entry.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "specific":
        versions = tuple(sorted(set(policy.specific.versions)))
        if not versions:
            raise ConfigError(f"model {entry.name!r}: specific policy lists no versions")
        return VersionPolicy(SPECIFIC, versions=versions)
    if choice == "all":
        return VersionPolicy(ALL)
    if choice == "latest":
        return VersionPolicy(LATEST, num_versions=max(1, policy.latest.num_versions))
    return VersionPolicy(LATEST)  # TF Serving's default: latest { num_versions: 1 }
