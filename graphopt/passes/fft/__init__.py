"""FFT convolution: long and large-kernel convolutions as matmul-FFT convolutions, by the cost model."""
from . import fft_conv  # noqa: F401
