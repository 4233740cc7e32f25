"""The method itself: the constitution as data, prompt formats, the critique -> revision loop."""
from .constitution import (ComparisonPrinciple, Constitution, ConstitutionError, CritiqueExample, CritiquePrinciple,
                           MultipleChoiceExample)
from .critique import CritiqueConfig, CritiqueStats, run_critique

__all__ = ["ComparisonPrinciple", "Constitution", "ConstitutionError", "CritiqueConfig", "CritiqueExample",
           "CritiquePrinciple", "CritiqueStats", "MultipleChoiceExample", "run_critique"]
