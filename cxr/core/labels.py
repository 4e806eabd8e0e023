"""The ChestX-ray14 label vocabulary in its fixed canonical order."""

PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
VOCABULARY: tuple[str, ...] = PATHOLOGIES + (NO_FINDING,)


def column_name(label: str) -> str:
    """Snake-case column for a label: 'Pleural_Thickening' -> 'pleural_thickening'."""
    return label.lower().replace(" ", "_")


LABEL_COLUMNS: tuple[str, ...] = tuple(column_name(p) for p in PATHOLOGIES)
NO_FINDING_COLUMN = column_name(NO_FINDING)

# The AG-CNN's three branches, in training order: each stage trains the branch of its name.
BRANCHES: tuple[str, ...] = ("global", "local", "fusion")
STAGES = BRANCHES
