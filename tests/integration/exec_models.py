"""The model zoo, under the name the execution tests use (see p2pfleet/zoo.py)."""

from p2pfleet.zoo import *  # noqa: F401,F403
from p2pfleet.zoo import MODELS, canary, digits, fp16_weights, magika, mlp784, small  # noqa: F401
