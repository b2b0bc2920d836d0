"""The known library messages the command line silences or replaces by one line (commands/noise.py), and only
those."""

import logging

import pytest
import transformers

from hybrid_engine.commands.common import quiet_libraries
from hybrid_engine.commands.main import main
from hybrid_engine.commands.noise import FILTERS, unused_lm_head
from tests.demo_models import demo_llama


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    """A handler on the DeepSpeed and transformers.modeling_utils loggers: what passes their filters."""
    handler = Records()
    loggers = [logging.getLogger(name) for name, _ in FILTERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


def test_deepspeeds_cpu_accelerator_warning_is_dropped_and_its_other_warnings_are_not(records):
    quiet_libraries()
    logger = logging.getLogger("DeepSpeed")
    logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    logger.warning("zero stage 3 needs more memory")
    assert records == ["zero stage 3 needs more memory"]


def test_a_reward_body_loading_a_causal_lm_says_one_line_not_a_table(tmp_path, records):
    demo_llama().save_pretrained(tmp_path)
    quiet_libraries()
    transformers.AutoModel.from_pretrained(tmp_path)
    assert records == [f"{tmp_path}: the causal LM's lm_head is not loaded (a reward model scores with its own head)"]


def test_other_load_reports_are_left_whole():
    report = ("\x1b[1mLlamaModel LOAD REPORT\x1b[0m from: /m\nKey | Status |  | \n----+---+--+-\n"
              "lm_head.weight | UNEXPECTED |  | \nlayers.0.mlp.up_proj.weight | MISSING |  | \n\nNotes: ...")
    assert unused_lm_head(report) is None
    assert unused_lm_head(report.replace("layers.0.mlp.up_proj.weight | MISSING |  | \n", "")) == "/m"
    assert unused_lm_head("some other warning") is None


def test_every_command_installs_the_filters():
    for name, cls in FILTERS:
        logging.getLogger(name).filters[:] = [f for f in logging.getLogger(name).filters if not isinstance(f, cls)]
    with pytest.raises(ValueError):
        main(["generate", "--preset", "nope", "--max-new-tokens", "1"])
    assert all(any(isinstance(f, cls) for f in logging.getLogger(name).filters) for name, cls in FILTERS)
