"""GCP TPU VM launcher (``python -m experiments.tpu_vm.launch --help``)."""
