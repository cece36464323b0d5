"""GenSR in plain torch: backbones, the model and its losses. Reads no dataset files and builds
no inputs (gensr_ray.inputs does); gensr_ray.assemble wires it to files."""
