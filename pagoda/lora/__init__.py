"""Multi-LoRA serving: many PEFT adapters over one base model, mixed in one batch.

request.py names an adapter (vLLM's LoRARequest); config.py holds the engine's limits; peft.py
reads and checks a PEFT adapter; layers.py adds the low-rank updates to the base linear layers;
manager.py places adapters in the device slots (LRU) over a CPU cache; registry.py is a server's
adapters by name. The kernels are in
pagoda/kernels/lora.py."""
