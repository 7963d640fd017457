"""plastic: neural circuits whose forward and feedback synapses are separate objects that learn
by local plasticity rules."""
from . import models
from .convert import convert, resolve_kind, synapses
from .errors import DataError, PlasticError, ResultsError, SpecError
from .feedback import FEEDBACK_KINDS, DirectFeedbackHub, FeedbackSynapse, make_feedback
from .metrics import angle, backprop, hidden_angles, update_angles, weight_angles
from .populations import RateParameters, RatePopulation, RateState, rate_step
from .synapses import Conv2d, Dense, Synapse, plasticity_paused

__version__ = "0.1.0"

from . import constraints
from .constraints import (Dale, SparseMask, apply_circuit_constraints, attach, constrain,
                          dale_signs, enforce, random_mask)
