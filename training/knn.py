"""The KNN head of the paper's ablation (docs/method.md §3.9, ablation row 6): classify an image by a majority vote
of its K nearest training images in the stage-1 embedding space."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    query_embeds: torch.Tensor,
    memory_embeds: torch.Tensor,
    memory_labels: torch.Tensor,
    num_classes: int,
    k: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Scores (N, C) whose argmax is the K-nearest-neighbour vote, under cosine similarity.

    For a query q with similarities s_j = cos(q, m_j) to the memory embeddings m_j, let V_c be the number of the K most
    similar memory embeddings of class c, and S_c = max_{j: y_j = c} s_j the similarity of the class's most similar
    memory embedding. The score is

        score_c = V_c + (1 + S_c) / 3,

    so the prediction (argmax) is the class with the most votes, and a tie in votes goes to the class whose nearest
    member is the more similar, i.e. the tied class met first when walking the neighbours from the nearest outwards
    (`collections.Counter.most_common`'s rule, the one the official stage-1 `knn_5` uses, docs/method.md §1.7). The
    fraction (1 + S_c)/3 lies in [0, 2/3], below one vote, so it never outweighs a vote. Classes without a vote are
    ranked by S_c alone, which gives top-5 a meaning; an exact tie in S_c goes to the lower class id (argmax).

    Args:
        query_embeds (`torch.Tensor` of shape `(N, D)`): raw embeddings of the images to classify.
        memory_embeds (`torch.Tensor` of shape `(N_m, D)`): raw embeddings of the memory (training) images.
        memory_labels (`torch.Tensor` of shape `(N_m,)`): class id of each memory image, in [0, `num_classes`).
        num_classes (`int`): C.
        k (`int`): neighbours that vote; clamped to N_m.
        batch_size (`int`, *optional*, defaults to 1024): queries scored at once.

    Returns:
        `torch.Tensor` of shape `(N, C)`, float64 on the CPU.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    memory_labels = torch.as_tensor(memory_labels).long().reshape(-1).cpu()  # (N_m,)
    if memory_embeds.shape[0] != memory_labels.shape[0] or memory_labels.numel() == 0:
        raise ValueError(
            f"need one label per memory embedding and at least one, got {memory_labels.shape[0]} labels for "
            f"{memory_embeds.shape[0]} embeddings"
        )
    if memory_labels.min() < 0 or memory_labels.max() >= num_classes:
        raise ValueError(f"memory_labels must lie in [0, {num_classes})")
    k = min(k, memory_labels.shape[0])
    memory = F.normalize(memory_embeds.double().cpu(), dim=-1)  # (N_m, D)
    queries = F.normalize(query_embeds.double().cpu(), dim=-1)  # (N, D)
    parts = []
    for start in range(0, queries.shape[0], batch_size):
        sims = queries[start : start + batch_size] @ memory.T  # (B, N_m) cosine similarities
        top = sims.topk(k, dim=1).indices  # (B, K) the K nearest memory images
        votes = F.one_hot(memory_labels[top], num_classes).sum(dim=1).double()  # (B, C) V_c
        nearest = torch.full((sims.shape[0], num_classes), -torch.inf, dtype=sims.dtype).scatter_reduce(
            1, memory_labels.expand_as(sims), sims, "amax"
        )  # (B, C) S_c
        nearest = nearest.clamp(min=-1.0)  # a class with no memory image ranks last
        parts.append(votes + (1.0 + nearest) / 3.0)  # (B, C)
    return torch.cat(parts) if parts else torch.zeros(0, num_classes, dtype=torch.float64)
