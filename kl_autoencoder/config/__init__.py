"""Typed training configs: plain YAML -> dataclasses, dotted overrides, validation with clear errors.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=20", "loss.gan.enabled=true"])

Every problem is reported before any work starts, as a `ConfigError` naming the dotted key and its value:
unknown keys (with a did-you-mean), wrong types (checked against the dataclass annotations), and impossible
values (non-positive learning rate, resolution not divisible by the downsampling factor, ...).

YAML 1.1 reads `1e-4` as a string; float fields therefore accept strings that parse as a float. It also reads `no`
as false: a field whose choices include "no" (`train.mixed_precision`) takes it back as "no". Every float must be finite.
YAML anchors/aliases are refused (a few hundred bytes of nested aliases expand to billions of values), and every
value an error message shows is cut short.

One room per concern; no room imports this `__init__`, and every name is re-exported here, so
`from kl_autoencoder.config import X` is the public way in:

    schema.py      the dataclasses, one per section (`TrainConfig` holds them all), and `ConfigError`
    yaml_io.py     YAML text <-> nested dicts <-> dataclasses: parsing, `a.b.c=value` overrides, type conversion, saving
    validation.py  value checks (`validate`), the resolved model architecture
    loading.py     `load_config` / `config_from_dict`: read, override, build, validate
    reference.py   docs/configuration.md, generated from schema.py's comments
                   (`python -m kl_autoencoder.config.reference > docs/configuration.md`)
"""

from kl_autoencoder.config.loading import config_from_dict, keeps_pretrained_latent_scale, load_config
from kl_autoencoder.config.schema import (
    BEST_DIRECTIONS, ConfigError, DataConfig, DistillSection, EMAConfig, EquivarianceConfig, Fp16FixSection,
    GanConfig, LossConfig, ModelSection, OptimConfig, TrainConfig, TrainSection, ValidationConfig,
)
from kl_autoencoder.config.validation import (
    MAX_RESOLUTION, autoencoder_fields, pretrained_architecture, resolved_architecture, validate, validate_data,
    validate_distill, validate_finite, validate_fp16_fix, validate_loss, validate_model, validate_optim,
    validate_preset, validate_train, validate_validation, validation_source,
)
from kl_autoencoder.config.yaml_io import (
    KEY_ALIASES, MAX_CONFIG_BYTES, REMOVED_KEYS, YAML_FALSE, YAML_TRUE, apply_override, build_section, check_type,
    config_to_dict, parse_yaml, save_config, type_name, unknown_key_message,
)
