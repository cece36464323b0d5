"""GenSR in plain torch: backbones, prompt designs, the model and its losses."""
