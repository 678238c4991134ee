import torch

from nnterp.prompts import Prompt, first_token_ids, run_prompts


def test_first_token_ids_cover_both_spellings(smollm2):
    tokenizer = smollm2.tokenizer
    ids = first_token_ids(tokenizer, "Paris")
    assert tokenizer.encode(" Paris", add_special_tokens=False)[0] in ids
    assert tokenizer.encode("Paris", add_special_tokens=False)[0] in ids
    assert len(ids) == len(set(ids)) == 2


def test_run_prompts_matches_single_traces_and_applies_intervention(smollm2):
    prompts = [
        Prompt.from_words("The capital of France is", {"paris": "Paris", "rome": "Rome"}, smollm2.tokenizer),
        Prompt.from_words("The capital of Italy is", {"paris": "Paris", "rome": "Rome"}, smollm2.tokenizer),
        Prompt.from_words("Paris is the capital of", {"france": "France"}, smollm2.tokenizer),
    ]
    result = run_prompts(smollm2, prompts, batch_size=2, progress=False)
    assert result["paris"][0] > 0.5 and result["rome"][1] > result["paris"][1]
    assert torch.isnan(result["france"][0]) and result["france"][2] > 0
    for i, prompt in enumerate(prompts[:2]):
        with torch.no_grad(), smollm2.trace(prompt.text):
            probs = smollm2.next_token_probs.save()
        assert torch.allclose(result["paris"][i], probs[0, prompt.targets["paris"]].sum(), atol=1e-5)
    steered = run_prompts(smollm2, prompts[:1], intervention=lambda m: m.skip_layers(0, m.num_layers - 1), progress=False)
    assert not torch.allclose(steered["paris"], result["paris"][:1])
