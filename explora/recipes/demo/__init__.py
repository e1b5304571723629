"""``explora demo``: ExPLoRA against the frozen backbone on real data, sized to a CPU budget."""
