"""A built-in sample of rows and responses, one set per task type, for ``megatron-rl score --sample``.

Written for this project (not taken from any benchmark); each response shows one scoring rule.
"""

from __future__ import annotations

SAMPLE: list[dict[str, object]] = [
    # Multiple choice: only the bare letter inside <answer></answer> counts.
    {"data_source": "MedIQ", "ground_truth": "B", "num_tokens": 300, "response_num_tokens": 290,
     "note": "right letter, well formed, close to the 300-token budget",
     "response": "<think>Fever and neck stiffness point to meningitis; the lumbar puncture comes first.</think>"
                 "<answer>B</answer>"},
    {"data_source": "MedIQ", "ground_truth": "B", "num_tokens": 300, "response_num_tokens": 1400,
     "note": "right letter, far over the budget",
     "response": "<think>" + "Consider each option in turn. " * 60 + "</think><answer>B</answer>"},
    {"data_source": "MedXpertQA", "ground_truth": "G", "num_tokens": -1,
     "note": "'(G)' is not the bare letter: counted wrong by the Med-U1 rule",
     "response": "<think>Option G fits the imaging.</think><answer>(G)</answer>"},
    {"data_source": "MedXpertQA", "ground_truth": "G", "num_tokens": -1,
     "note": "no <think> block: format -1",
     "response": "<answer>G</answer>"},
    # MedCalc: a number inside the inclusive limits, or an exact date / (weeks, days) tuple.
    {"data_source": "MedCalc-Bench", "ground_truth": "24.5", "lower_limit": "23.275", "upper_limit": "25.725",
     "num_tokens": -1, "note": "within the limits",
     "response": "<think>BMI = 75 kg / (1.75 m)^2 = 24.49.</think><answer>24.49</answer>"},
    {"data_source": "MedCalc-Bench", "ground_truth": "24.5", "lower_limit": "23.275", "upper_limit": "25.725",
     "num_tokens": -1, "note": "a unit makes it no number",
     "response": "<think>BMI is about 24.5.</think><answer>24.5 kg/m^2</answer>"},
    {"data_source": "MedCalc-Bench", "ground_truth": "03/14/2024", "num_tokens": -1,
     "note": "a date must match exactly",
     "response": "<think>LMP plus 280 days.</think><answer>03/14/2024</answer>"},
    # Open-ended: Merge = 0.5 EMS (0-100) + 0.5 BLEU (0-1) must exceed 45.
    {"data_source": "medical-o1-reasoning-SFT", "num_tokens": -1,
     "ground_truth": "Start intravenous ceftriaxone and vancomycin immediately after blood cultures.",
     "note": "near-verbatim answer",
     "response": "<think>Bacterial meningitis is likely.</think>"
                 "<answer>Start intravenous ceftriaxone and vancomycin after blood cultures.</answer>"},
    {"data_source": "medical-o1-reasoning-SFT", "num_tokens": -1,
     "ground_truth": "Start intravenous ceftriaxone and vancomycin immediately after blood cultures.",
     "note": "a fair paraphrase still fails: Merge mixes 0-100 EMS with 0-1 BLEU",
     "response": "<think>Bacterial meningitis is likely.</think>"
                 "<answer>Start ceftriaxone and vancomycin intravenously after blood cultures.</answer>"},
    {"data_source": "medical-o1-reasoning-SFT", "num_tokens": -1,
     "ground_truth": "Start intravenous ceftriaxone and vancomycin immediately after blood cultures.",
     "note": "unrelated answer",
     "response": "<think>Probably viral.</think><answer>Rest and fluids at home.</answer>"},
    {"data_source": "medical-o1-reasoning-SFT", "num_tokens": -1,
     "ground_truth": "Start intravenous ceftriaxone and vancomycin immediately after blood cultures.",
     "note": "no answer at all: -1 format, -2 answer",
     "response": "I am not sure."},
]
