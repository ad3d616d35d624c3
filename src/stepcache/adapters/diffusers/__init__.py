"""diffusers models: sites declared per block class (common.py), the pipeline clock (clock.py), families."""
