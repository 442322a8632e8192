"""LoRA adapters: loading, fusing and switching them (`lora`), and each request's choice (`choice`)."""
