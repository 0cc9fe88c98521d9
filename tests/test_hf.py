"""Hugging Face GPT-2, LLaMA and BERT (tiny configs, tied embeddings, random init, no
download)."""

import pytest
import torch
from helpers import freed_before
from test_private_grad import assert_close

import dplis
from dplis.models import lm_loss
from dplis.private_grad import resolve_engine, trainable
from dplis.reference import naive_private_grad

transformers = pytest.importorskip("transformers")


class CausalLM(torch.nn.Module):
    """(tokens, mask) -> logits of a transformers causal LM, with explicit [B, T] positions
    (GPT-2 broadcasts [1, T])."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens, mask):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.lm(input_ids=tokens, attention_mask=mask, position_ids=positions).logits


def gpt2() -> CausalLM:
    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2,
                                     n_head=2, tie_word_embeddings=True, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0,
                                     bos_token_id=0)
    return CausalLM(transformers.GPT2LMHeadModel(config))


def llama() -> CausalLM:
    """A tiny LLaMA (grouped-query attention, rotary positions, tied head): its RMSNorm is
    transformers' own class, which has no ghost rule, so it takes the vmap fallback."""
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    return CausalLM(transformers.LlamaForCausalLM(config))


def batch():
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return tokens, mask, tokens.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("low_memory", [False, True])
def test_gpt2_private_grad_matches_reference(low_memory):
    torch.manual_seed(0)
    model = gpt2()
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight
    assert resolve_engine("auto", model, trainable(model)) == "ghost"  # Conv1D has a rule
    tokens, mask, targets = batch()
    fast = dplis.private_grad(model, lm_loss, (tokens, mask), targets, max_grad_norm=0.1,
                              noise_multiplier=0.0, low_memory=low_memory)
    assert_close(fast, naive_private_grad(model, lm_loss, (tokens, mask), targets,
                                          max_grad_norm=0.1))


def test_gpt2_conv1d_outputs_are_not_held_through_the_backward():
    """Conv1D returns a view of the matmul result it made: the engine asks for the gradient
    at that result, so the output is freed once the activation's backward used it (checked
    when the gradient reaches the LayerNorm before it), and the gradients stay exact."""
    torch.manual_seed(0)
    model = gpt2()
    tokens, mask, targets = batch()
    block = model.lm.transformer.h[0]
    with freed_before(block.mlp.c_fc, block.ln_2) as seen:
        got = dplis.private_grad(model, lm_loss, (tokens, mask), targets, max_grad_norm=0.05,
                                 noise_multiplier=0.0, engine="ghost", verify=False)
    assert seen["freed"] is True
    assert_close(got, naive_private_grad(model, lm_loss, (tokens, mask), targets,
                                         max_grad_norm=0.05))


def test_gpt2_trains_with_the_trainer():
    torch.manual_seed(0)
    model = gpt2()
    tokens, mask, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = dplis.PrivateTrainer(model, opt, lm_loss, sample_rate=0.1, max_grad_norm=1.0,
                                   noise_multiplier=0.5, expected_batch_size=3.0, seed=0,
                                   smoothing_std=1e-3, num_perturbations=2)
    losses = [trainer.step((tokens, mask), targets) for _ in range(15)]
    assert losses[-1] < losses[0]


def test_llama_runs_the_ghost_engine_with_the_fallback():
    torch.manual_seed(0)
    model = llama()
    owners = {type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False))}
    assert owners == {"Embedding", "Linear", "LlamaRMSNorm"}
    tokens, mask, targets = batch()
    step = dplis.private_step(model, lm_loss, (tokens, mask), targets, max_grad_norm=0.1,
                              noise_multiplier=0.0)
    assert step.engine == "ghost"
    assert_close(step.grads, naive_private_grad(model, lm_loss, (tokens, mask), targets,
                                                max_grad_norm=0.1))


class MaskedLM(torch.nn.Module):
    """(tokens, mask) -> logits of a transformers encoder called as its docs show: no
    position ids, so it takes its own [1, T] ones, and its position table's output is
    shared by the batch."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens, mask):
        return self.lm(input_ids=tokens, attention_mask=mask).logits


@pytest.mark.parametrize("low_memory", [False, True])
def test_bert_with_its_default_positions_runs_the_ghost_engine(low_memory):
    """The ghost engine refused the shared position table, and the vmap engine cannot run
    transformers' padding-mask code (torch.vmap: "calling .item()"), so "auto" failed."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = MaskedLM(transformers.BertForMaskedLM(config))
    tokens, mask, targets = batch()
    step = dplis.private_step(model, lm_loss, (tokens, mask), targets, max_grad_norm=0.1,
                              noise_multiplier=0.0, low_memory=low_memory)
    assert step.engine == "ghost"
    assert_close(step.grads, naive_private_grad(model, lm_loss, (tokens, mask), targets,
                                                max_grad_norm=0.1))


class Seq2Seq(torch.nn.Module):
    """(tokens, mask, decoder tokens) -> decoder logits of a transformers encoder-decoder."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens, mask, decoder_tokens):
        return self.lm(input_ids=tokens, attention_mask=mask, decoder_input_ids=decoder_tokens,
                       use_cache=False).logits


def test_t5_with_padding_runs_the_loop_engine():
    """The ghost engine refuses T5's relative-position table (its input has no batch
    dimension) and the vmap engine cannot run transformers' padding-mask code: "auto" failed
    with torch's vmap error, and now runs the loop engine, with a warning giving both
    reasons."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                   num_decoder_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = Seq2Seq(transformers.T5ForConditionalGeneration(config))
    tokens, mask, _ = batch()
    decoder = torch.randint(1, 40, (3, 5))
    targets = decoder.roll(-1, 1)
    inputs = (tokens, mask, decoder)
    expected = naive_private_grad(model, lm_loss, inputs, targets, max_grad_norm=0.1)
    with pytest.warns(UserWarning, match=r"runs the loop engine .*relative_attention_bias.*"
                                         r"torch.vmap could not"):
        auto = dplis.private_step(model, lm_loss, inputs, targets, max_grad_norm=0.1,
                                  noise_multiplier=0.0)
    assert auto.engine == "loop"
    assert_close(auto.grads, expected)
