"""Recording, the trace store, input multiplication, filtering, splits and the training loader."""
