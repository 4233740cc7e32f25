"""The Constitutional AI method: the constitution as data, prompt formats, the critique -> revision loop,
AI feedback and multiple-choice scoring. Uses the engine and the ops; holds no training loop."""
from .constitution import (ComparisonPrinciple, Constitution, ConstitutionError, CritiqueExample, CritiquePrinciple,
                           MultipleChoiceExample)
from .critique import CritiqueConfig, CritiqueStats, run_critique

__all__ = ["ComparisonPrinciple", "Constitution", "ConstitutionError", "CritiqueConfig", "CritiqueExample",
           "CritiquePrinciple", "CritiqueStats", "MultipleChoiceExample", "run_critique"]
