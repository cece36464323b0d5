"""From stored examples to model inputs: prompt designs, item title tokens, pointwise rows and
their padding into tensors. Plain Python / numpy on the CPU side; `gensr_ray.model` does not
import this package, and this package does not import the model."""
