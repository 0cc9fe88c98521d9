"""GPT- and BERT-style models from code, trained with PrivateTrainer on padded tokens."""

import pytest

from dplis.experiments import language_model


@pytest.mark.parametrize("model,factor", [("gpt", 0.5), ("bert", 1.0)])
def test_private_language_model_learns(model, factor):
    losses = language_model.main(["--model", model, "--examples", "800", "--steps", "60",
                                  "--batch-size", "80"])
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # GPT (tied head, large initial loss) halves it; BERT's masked tokens learn slower
    assert last < factor * first, (first, last)


def test_low_memory_gpt_learns_and_needs_one_pass():
    losses = language_model.main(["--model", "gpt", "--examples", "800", "--steps", "60",
                                  "--batch-size", "80", "--perturbations", "1",
                                  "--low-memory"])
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
    with pytest.raises(SystemExit):
        language_model.main(["--low-memory"])  # K = 2 by default


def test_padding_carries_no_target():
    data = language_model.synthetic_tokens(50, 16, 32, causal=True)
    tokens, mask, targets = data.tensors
    assert bool((targets[~mask] == -100).all()) and bool((tokens[~mask] == 0).all())
    bert = language_model.synthetic_tokens(50, 16, 32, causal=False)
    assert bool((bert.tensors[2][~bert.tensors[1]] == -100).all())
