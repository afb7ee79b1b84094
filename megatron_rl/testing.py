"""Tiny, offline, random-weight Qwen2 checkpoints for tests, benchmarks and the CPU quickstart.

The trainer targets Qwen2-family models, but the unit tests, the micro-benchmarks and the
CPU quickstart run where the Hugging Face hub is unreachable. :func:`tiny_model` therefore
builds a complete checkpoint directory from nothing:

* ``config.json`` + ``model.safetensors``: a :class:`transformers.Qwen2ForCausalLM` with
  random fp32 weights (2 layers, hidden 128, 4 query heads / 2 KV heads, tied embeddings).
  Shapes are chosen so that vLLM's CPU backend can serve it (``head_dim`` must be one of
  32/64/80/96/112/128 there).
* ``generation_config.json``: BOS/PAD/EOS ids like Qwen2.5-Instruct (stop on ``<|im_end|>``
  or ``<|endoftext|>``), with no sampling defaults.
* ``tokenizer.json`` + ``tokenizer_config.json`` + chat template: a 1024-token byte-level
  BPE tokenizer trained in milliseconds on a small built-in medical Q&A corpus, with
  Qwen2's pre-tokenizer (NFC, single digits, ByteLevel without prefix space), Qwen's special
  tokens as the last ids (``<|endoftext|>`` = pad/bos, ``<|im_start|>``, ``<|im_end|>`` = eos)
  and the Qwen2.5-Instruct chat template (without the tool-calling branches).
  ``decode(encode(text)) == text`` for any NFC-normalised text (newlines, tabs, tags such as
  ``<think>``/``<answer>``, non-ASCII, emoji); like real Qwen2.5, the NFC normalizer turns
  decomposed characters into composed ones. transformers 5 forces ``Qwen2Tokenizer`` (which
  always applies NFC) onto ``qwen2`` checkpoints, so dropping NFC would only make the saved
  file and the loaded tokenizer disagree.

Everything is deterministic: the tokenizer is the same on every call and the weights depend
only on ``seed``, so the same seed gives bit-identical files. The model knows nothing, so
it is for plumbing (shapes, dtypes, sharding, weight sync, generation, rewards), not quality.

Example::

    from megatron_rl.testing import tiny_model
    path = tiny_model(tmp_path / "tiny")            # defaults
    path = tiny_model(tmp_path / "untied", tie_word_embeddings=False, num_hidden_layers=4)
"""

from __future__ import annotations

import functools
import inspect
import json
import pathlib
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = [
    "DEFAULT_CONFIG",
    "SUPPORTED_HEAD_DIMS",
    "TOKENIZER_VOCAB_SIZE",
    "build_config",
    "build_tokenizer",
    "tiny_model",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Added after BPE training, so they get the last ids, as in Qwen2.5.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

#: Total tokenizer size, special tokens included.
TOKENIZER_VOCAB_SIZE = 1024

#: Head sizes vLLM's CPU attention kernels accept.
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (32, 64, 80, 96, 112, 128)

#: Qwen2Config defaults for the tiny model (vocab and special-token ids come from the tokenizer).
DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_sliding_window": False,
}

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

#: Qwen2.5-Instruct's chat template with the tool-calling branches removed. For
#: conversations without tools it renders exactly what the original renders.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

#: Qwen2's pre-tokenization regex: contractions, letter runs, single digits, punctuation
#: runs, newline runs and whitespace (digits are split one by one, as in Qwen).
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
Question: A 45-year-old man presents with crushing chest pain radiating to the left arm. What is the most likely diagnosis?
A: Acute myocardial infarction
B: Pulmonary embolism
C: Gastroesophageal reflux disease
D: Costochondritis
<think>
The pain is crushing and radiates to the left arm, and he is a middle-aged man. That pattern points to cardiac ischemia.
</think>
<answer>A</answer>
Question: A 6-year-old girl has a fever of 39.2 °C, a sore throat and tender cervical lymph nodes without cough. Which test should be done first?
A: Chest X-ray
B: Rapid streptococcal antigen test
C: Blood culture
D: Lumbar puncture
<think>
Fever, exudative pharyngitis, tender nodes and no cough give a high Centor score, so test for group A streptococcus.
</think>
<answer>B</answer>
Question: Which vitamin deficiency causes scurvy?
A: Vitamin A
B: Vitamin B12
C: Vitamin C
D: Vitamin D
<think>
Scurvy comes from a lack of ascorbic acid, which is needed for collagen synthesis. Bleeding gums and poor wound healing follow.
</think>
<answer>C</answer>
Question: A patient on warfarin has an INR of 8.5 and no bleeding. What is the best next step?
A: Give fresh frozen plasma
B: Hold warfarin and give oral vitamin K
C: Continue the current dose
D: Start heparin
<think>
The INR is above 4.5 but below 10 without bleeding; guidelines suggest holding the dose and giving low-dose oral vitamin K.
</think>
<answer>B</answer>
Question: The patient was admitted on 2023-03-14 and discharged on 2023-03-21. How many days did she stay?
<think>
From March 14 to March 21 is 7 days.
</think>
<answer>7</answer>
Question: What is the normal range of fasting plasma glucose in adults?
<think>
Normal fasting glucose is 70 to 99 mg/dL, or about 3.9 to 5.5 mmol/L. Values from 100 to 125 mg/dL suggest prediabetes.
</think>
<answer>70-99 mg/dL</answer>
Question: A 68-year-old woman with atrial fibrillation has a CHA2DS2-VASc score of 4. What should be started?
A: Aspirin alone
B: An oral anticoagulant such as apixaban
C: No therapy
D: Clopidogrel and aspirin
<think>
A score of 2 or more in women means anticoagulation is recommended, and a direct oral anticoagulant is preferred.
</think>
<answer>B</answer>
Question: Which nerve is injured in a fracture of the surgical neck of the humerus?
A: Radial nerve
B: Axillary nerve
C: Median nerve
D: Ulnar nerve
<think>
The axillary nerve wraps around the surgical neck with the posterior circumflex humeral artery.
</think>
<answer>B</answer>
Question: A newborn has bilious vomiting on day 2 of life, and an abdominal film shows a double bubble sign. What is the diagnosis?
<think>
A double bubble with bilious vomiting in a neonate suggests duodenal atresia, which is associated with Down syndrome.
</think>
<answer>Duodenal atresia</answer>
Question: What is the first-line treatment for anaphylaxis?
A: Oral antihistamine
B: Intramuscular epinephrine 0.5 mg
C: Intravenous hydrocortisone
D: Nebulized salbutamol
<think>
Epinephrine into the anterolateral thigh is the first drug for anaphylaxis; the others are adjuncts.
</think>
<answer>B</answer>
Question: A 30-year-old woman has heat intolerance, weight loss, tremor, exophthalmos and a diffuse goiter. TSH is low and free T4 is high. What is the cause?
A: Hashimoto thyroiditis
B: Graves disease
C: Toxic multinodular goiter
D: Subacute thyroiditis
<think>
Exophthalmos is specific for Graves disease, an autoimmune disorder with antibodies that stimulate the TSH receptor.
</think>
<answer>B</answer>
Question: Calculate the body mass index of a man who weighs 90 kg and is 1.80 m tall.
<think>
BMI equals weight divided by height squared: 90 / (1.80 * 1.80) = 90 / 3.24 = 27.8 kg/m2, which is overweight.
</think>
<answer>27.8</answer>
Question: A 55-year-old smoker has hemoptysis and hypercalcemia. Which lung tumor is most likely?
A: Small cell carcinoma
B: Squamous cell carcinoma
C: Adenocarcinoma
D: Carcinoid tumor
<think>
Squamous cell carcinoma is central, linked to smoking, and can secrete PTH-related peptide, causing high calcium.
</think>
<answer>B</answer>
Question: Which antibiotic is associated with tendon rupture?
A: Amoxicillin
B: Ciprofloxacin
C: Doxycycline
D: Azithromycin
<think>
Fluoroquinolones such as ciprofloxacin carry a warning for tendinitis and Achilles tendon rupture, especially in the elderly.
</think>
<answer>B</answer>
Question: A child has a barking cough, inspiratory stridor and a steeple sign on neck radiograph. What is the treatment?
<think>
This is croup, usually caused by parainfluenza virus. A single dose of dexamethasone helps, and nebulized epinephrine is for severe cases.
</think>
<answer>Dexamethasone</answer>
Question: What is the mechanism of action of metformin?
A: Stimulates insulin release from beta cells
B: Decreases hepatic gluconeogenesis
C: Inhibits alpha-glucosidase
D: Blocks SGLT2 in the kidney
<think>
Metformin is a biguanide that activates AMP kinase and lowers glucose production by the liver; it does not cause hypoglycemia alone.
</think>
<answer>B</answer>
Question: On 12 January 2024 a patient's creatinine rose from 1.0 to 2.1 mg/dL within 48 hours. Which stage of acute kidney injury is this?
<think>
A rise to 2.0 to 2.9 times baseline is KDIGO stage 2.
</think>
<answer>Stage 2</answer>
Question: Which electrolyte abnormality causes peaked T waves on the electrocardiogram?
A: Hypokalemia
B: Hyperkalemia
C: Hyponatremia
D: Hypercalcemia
<think>
High potassium gives tall peaked T waves, then a wide QRS complex and a sine wave pattern. Give calcium gluconate to stabilize the heart.
</think>
<answer>B</answer>
Question: A 72-year-old man has resting tremor, rigidity and bradykinesia. Which neurotransmitter is deficient?
A: Acetylcholine
B: Serotonin
C: Dopamine
D: GABA
<think>
Parkinson disease comes from the loss of dopaminergic neurons in the substantia nigra.
</think>
<answer>C</answer>
Question: The blood pressure is 150/95 mmHg on three visits. What is the stage of hypertension?
<think>
A systolic pressure of 140 or higher, or a diastolic pressure of 90 or higher, is stage 2 hypertension.
</think>
<answer>Stage 2 hypertension</answer>
Question: Which organism causes most cases of community-acquired pneumonia?
A: Staphylococcus aureus
B: Streptococcus pneumoniae
C: Klebsiella pneumoniae
D: Pseudomonas aeruginosa
<think>
The pneumococcus is the most common bacterial cause of pneumonia acquired in the community.
</think>
<answer>B</answer>
Question: A pregnant woman at 34 weeks has blood pressure 160/110 mmHg, headache and proteinuria. What drug prevents seizures?
A: Magnesium sulfate
B: Phenytoin
C: Diazepam
D: Labetalol
<think>
Severe preeclampsia needs magnesium sulfate for seizure prophylaxis; labetalol lowers the pressure but does not prevent eclampsia.
</think>
<answer>A</answer>
Question: What is the antidote for acetaminophen overdose?
<think>
N-acetylcysteine restores glutathione stores and is most effective within 8 hours of ingestion.
</think>
<answer>N-acetylcysteine</answer>
Question: A patient has a hemoglobin of 9.1 g/dL with a mean corpuscular volume of 72 fL and low ferritin. What type of anemia is this?
A: Iron deficiency anemia
B: Vitamin B12 deficiency
C: Anemia of chronic disease
D: Hemolytic anemia
<think>
Microcytic anemia with low ferritin is iron deficiency, often from chronic blood loss.
</think>
<answer>A</answer>
Question: How much maintenance fluid does a 20 kg child need per hour?
<think>
By the 4-2-1 rule: 4 mL/kg for the first 10 kg, 2 mL/kg for the next 10 kg, so 40 + 20 = 60 mL per hour.
</think>
<answer>60 mL/h</answer>
Question: Which heart sound is heard in aortic stenosis?
A: A diastolic rumble at the apex
B: A crescendo-decrescendo systolic murmur at the right upper sternal border
C: A holosystolic murmur at the apex
D: An opening snap
<think>
Aortic stenosis gives an ejection murmur that radiates to the carotids, with syncope, angina and dyspnea on exertion.
</think>
<answer>B</answer>
Doctors should review the medication list at every visit, check for drug interactions, and adjust doses for renal function.
The nurse recorded a temperature of 37.8 °C, a pulse of 104 beats per minute and an oxygen saturation of 93% on room air.
Informed consent was obtained on 05/09/2022 before the procedure, and there were no complications.
Sepsis is a life-threatening organ dysfunction caused by a dysregulated host response to infection.
Type 1 diabetes is an autoimmune destruction of pancreatic beta cells, while type 2 diabetes involves insulin resistance.
Chronic obstructive pulmonary disease is treated with bronchodilators, smoking cessation and pulmonary rehabilitation.
Stroke symptoms include facial droop, arm weakness and speech difficulty; time to treatment is critical.
The differential diagnosis of abdominal pain in the right lower quadrant includes appendicitis, ovarian torsion and ectopic pregnancy.
Patients with heart failure benefit from beta blockers, ACE inhibitors, mineralocorticoid antagonists and SGLT2 inhibitors.
Children receive the measles, mumps and rubella vaccine at 12 months and again at 4 to 6 years of age.
Le patient présente une douleur thoracique; la fièvre est à 38,5 °C. Der Patient hat Fieber und Husten.
"""


def tiny_model(path: str | pathlib.Path, *, seed: int = 0, **overrides: Any) -> pathlib.Path:
    """Write a tiny random-weight Qwen2 causal LM and its tokenizer to ``path``.

    Defaults: hidden_size 128, 4 attention heads of dim 32, 2 KV heads, 2 layers,
    intermediate_size 256, max_position_embeddings 4096, rope_theta 1e6, rms_norm_eps 1e-6,
    tied embeddings, SiLU, fp32 weights, vocab_size 1024 (the tokenizer's size).

    Args:
        path: Output directory (created if missing; existing files are overwritten).
        seed: Seed for the weight initialisation. The same seed gives bit-identical
            ``model.safetensors``; the tokenizer does not depend on it.
        **overrides: Any :class:`transformers.Qwen2Config` field, e.g.
            ``tie_word_embeddings=False``, ``num_hidden_layers=4``, ``hidden_size=256``.
            ``vocab_size`` may only grow the embedding beyond the tokenizer's 1024 tokens.

    Returns:
        ``path`` as a :class:`pathlib.Path`, loadable offline with ``AutoTokenizer`` and
        ``AutoModelForCausalLM`` (and by vLLM).

    Raises:
        ValueError: An override is not a Qwen2Config field, the head layout is invalid
            (head_dim not in :data:`SUPPORTED_HEAD_DIMS`, heads not dividing evenly), or
            ``vocab_size`` is smaller than the tokenizer.
    """
    out = pathlib.Path(path)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, out)
    _save_model(config, out, seed)
    _save_generation_config(config, tokenizer, out)
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the tiny tokenizer as a ``PreTrainedTokenizerFast`` with the Qwen2.5 chat template."""
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=DEFAULT_CONFIG["max_position_embeddings"],
        padding_side="right",
    )


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE on the built-in corpus and return it as JSON (cached).

    The pipeline (NFC normalizer, Qwen2 split regex, ByteLevel without prefix space, ByteLevel
    decoder) is exactly the one transformers' ``Qwen2Tokenizer`` rebuilds from ``vocab`` and
    ``merges``: transformers 5 always loads ``qwen2`` checkpoints through that class, so the
    saved ``tokenizer.json`` and what ``AutoTokenizer`` (and vLLM) load behave identically.
    """
    tokenizer = Tokenizer(
        models.BPE(
            unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    bpe_size = TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=False)
    if trained != bpe_size:  # only possible if the corpus is edited
        raise RuntimeError(f"BPE training produced {trained} tokens, expected {bpe_size}: corpus too small")
    # The trainer resets these to null; Qwen2Tokenizer rebuilds with "" (same behaviour).
    tokenizer.model.continuing_subword_prefix = ""
    tokenizer.model.end_of_word_suffix = ""
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer.to_str()


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: pathlib.Path) -> None:
    """Save the tokenizer with a ``tokenizer_config.json`` shaped like Qwen2.5-Instruct's.

    transformers 5 writes the extra special tokens as a list under ``extra_special_tokens``,
    which transformers 4.x (still used by some vLLM releases) cannot read; the Qwen2.5 form
    (``additional_special_tokens``, inline ``chat_template``) loads in both.
    """
    tokenizer.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.pop("extra_special_tokens", None)
    data.update(
        tokenizer_class="Qwen2Tokenizer",
        additional_special_tokens=[IM_START, IM_END],
        add_prefix_space=False,
        errors="replace",
        chat_template=CHAT_TEMPLATE,
    )
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=1)
def _config_fields() -> frozenset[str]:
    """Names accepted as Qwen2Config overrides in the installed transformers version."""
    params = inspect.signature(Qwen2Config.__init__).parameters
    names = {name for name, p in params.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    names |= set(Qwen2Config().to_dict())
    # transformers 5 folds rope_theta into rope_parameters but still accepts it.
    names.add("rope_theta")
    names -= {"model_type", "transformers_version", "architectures", "_name_or_path"}
    return frozenset(names)


def build_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> Qwen2Config:
    """Return the tiny Qwen2Config, with ``overrides`` applied and validated (see :func:`tiny_model`)."""
    unknown = sorted(set(overrides) - _config_fields())
    if unknown:
        raise ValueError(f"not a Qwen2Config field: {', '.join(unknown)}")
    if "rope_parameters" in overrides and "rope_theta" in overrides:
        raise ValueError("override either rope_theta or rope_parameters, not both")
    tokenizer_size = len(tokenizer)
    values: dict[str, Any] = {
        **DEFAULT_CONFIG,
        "vocab_size": tokenizer_size,
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "dtype": "float32",
    }
    if "rope_parameters" in overrides:
        values.pop("rope_theta")
    values.update(overrides)
    _validate(values, tokenizer_size)
    config = Qwen2Config(**values)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def _validate(values: dict[str, Any], tokenizer_size: int) -> None:
    """Check the head layout and vocabulary size; raise ValueError naming the bad field."""
    for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                 "intermediate_size", "vocab_size", "max_position_embeddings"):
        value = values.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    hidden, heads, kv_heads = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    head_dim = hidden // heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim={head_dim} (hidden_size={hidden} / num_attention_heads={heads}) is not supported: "
            f"vLLM's CPU attention needs head_dim >= 32, one of {SUPPORTED_HEAD_DIMS}"
        )
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}")
    _torch_dtype(values["dtype"])
    if values["vocab_size"] < tokenizer_size:
        raise ValueError(f"vocab_size={values['vocab_size']} is smaller than the tokenizer ({tokenizer_size} tokens)")


def _torch_dtype(value: str | torch.dtype) -> torch.dtype:
    """Map a config ``dtype`` ("float32", "bfloat16", "float16" or a torch.dtype) to torch."""
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={value!r} must be float32, bfloat16 or float16")
    return dtype


def _save_model(config: Qwen2Config, out: pathlib.Path, seed: int) -> None:
    """Initialise the weights from ``seed`` without touching the global RNG, and save them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(_torch_dtype(config.dtype))
    model.save_pretrained(out, safe_serialization=True)
    _add_legacy_config_keys(out / "config.json", config)


def _add_legacy_config_keys(config_file: pathlib.Path, config: Qwen2Config) -> None:
    """Also write ``rope_theta``/``torch_dtype`` so transformers 4.x readers (older vLLM) agree."""
    data = json.loads(config_file.read_text())
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        data.setdefault("rope_theta", theta)
    data.setdefault("torch_dtype", str(_torch_dtype(config.dtype)).removeprefix("torch."))
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_generation_config(config: Qwen2Config, tokenizer: PreTrainedTokenizerFast, out: pathlib.Path) -> None:
    """Write Qwen2.5-Instruct-style stop ids (``<|im_end|>``, ``<|endoftext|>``), no sampling defaults."""
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id, eos_token_id=eos_ids
    )
    generation.save_pretrained(out)
