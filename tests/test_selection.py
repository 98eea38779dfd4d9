"""The selection's competitors and the report's optional entries, without a model (whole runs:
tests/test_pipeline.py)."""
import types

import torch

from probprune.report import Report
from probprune.search import SearchState
from probprune.selection import Candidate, CandidateScore, Selection, competitors


def _state():
    init = torch.tensor([True, True, False, False])
    state = SearchState.start(torch.full((4,), 0.5), init, 3.0)
    state.offer(2, 2.5, torch.tensor([True, False, True, False]), keep=3)
    state.offer(4, 2.0, torch.tensor([False, True, True, False]), keep=3)
    return state


def test_the_best_bare_mask_competes_with_the_init():
    pool = competitors(types.SimpleNamespace(select_candidates=1), _state())
    assert [(c.step, c.val_loss) for c in pool] == [(4, 2.0), (0, 3.0)]
    assert all(isinstance(c, Candidate) for c in pool)


def test_the_init_competes_once_among_the_candidates():
    state = _state()
    pool = competitors(types.SimpleNamespace(select_candidates=3), state)
    assert [(c.step, c.val_loss) for c in pool] == [(4, 2.0), (2, 2.5), (0, 3.0)]
    state.offer(6, 1.5, torch.tensor([True, False, False, True]), keep=3)  # the init drops out
    pool = competitors(types.SimpleNamespace(select_candidates=3), state)
    assert [c.step for c in pool] == [6, 4, 2, 0] and torch.equal(pool[-1].mask, state.init_mask)


def test_the_export_mask_is_the_compensations_where_there_is_one():
    searched = torch.tensor([True, False])
    assert Selection(searched, None, 3).mask is searched
    comp = types.SimpleNamespace(mask=torch.tensor([False, True]))
    assert Selection(searched, comp, 3, [CandidateScore(3, 2.0, 1.5, True)]).mask is comp.mask


def test_report_leaves_out_optional_entries_that_are_none():
    values = {name: None for name in Report.__dataclass_fields__}
    entries = Report(**values).as_dict()
    assert "median_step_s" in entries  # None there means no step was timed: it stays
    assert not set(entries) & set(Report.OPTIONAL)
    assert list(Report(**{**values, "speed": {}}).as_dict())[-1] == "speed"
