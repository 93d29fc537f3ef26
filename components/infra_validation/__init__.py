"""Stage 5, infra-validation (TFX's InfraValidator): `validator.run_infra_validation`."""
