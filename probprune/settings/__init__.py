"""The settings of each stage of a run, one definition per setting (:mod:`.base` says how a
setting is defined). These modules import nothing of the engine: the engine imports them."""
from .base import ConfigError, Problem, Settings, one_line, setting
from .budget import BudgetSettings
from .compensation import CompensationSettings
from .data import DataSettings
from .evaluation import EvalSettings
from .run import RunSettings, default_device
from .search import INIT_METHODS, SearchSettings

# the order of the stages in ``--help``
STAGES = (DataSettings, BudgetSettings, SearchSettings, CompensationSettings, EvalSettings,
          RunSettings)

__all__ = ["BudgetSettings", "CompensationSettings", "ConfigError", "DataSettings",
           "EvalSettings", "INIT_METHODS", "Problem", "RunSettings", "STAGES", "SearchSettings",
           "Settings", "default_device", "one_line", "setting"]
