"""Continual learning: quality judge, replay buffer, EWC, forgetting metrics, LearningService.

The service is imported lazily so the pure parts (judge, replay, EWC, metrics) can be used
without the router package.
"""
from .ewc import EWCState, ewc_penalty, fisher_diag, snapshot
from .judge import (JudgeResult, LLMJudge, QualityJudge, calibration_markdown, calibration_table,
                    feedback_signal, gold_match, logprob_confidence, normalize_answer)
from .metrics import (AccuracyMatrix, average_accuracy, average_forgetting, backward_transfer,
                      continual_report, forgetting_per_10k_updates, forgetting_per_phase)
from .offpolicy import LoggedDecision, off_policy_estimate
from .outcome import Outcome, outcome_of
from .replay import ReplayBuffer

__all__ = [
    "EWCState", "ewc_penalty", "fisher_diag", "snapshot",
    "JudgeResult", "LLMJudge", "QualityJudge", "calibration_markdown", "calibration_table",
    "feedback_signal", "gold_match", "logprob_confidence", "normalize_answer",
    "AccuracyMatrix", "average_accuracy", "average_forgetting", "backward_transfer",
    "continual_report", "forgetting_per_10k_updates", "forgetting_per_phase",
    "ReplayBuffer", "LearningService", "Interaction", "ContinualTrainer", "Outcome", "outcome_of",
    "LoggedDecision", "off_policy_estimate",
]


def __getattr__(name):
    if name in ("LearningService", "Interaction"):
        from . import service
        return getattr(service, name)
    if name == "ContinualTrainer":
        from .trainer import ContinualTrainer
        return ContinualTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
