"""Model downloads from the Hugging Face Hub: the one thing llama-chat sends over the network."""

from __future__ import annotations

from app.errors import LlamaChatError

# The transformers-format files; Meta's original/ copy would double the download.
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.md"]


class DownloadError(LlamaChatError):
    title = "Download failed"


def _progress_bar(report):
    """A tqdm class that also reports "name: 45% of 2.5 GB" lines (for the app's status bar)."""
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def update(self, n=1):
            out = super().update(n)
            if self.total:
                report(f"{self.desc or 'downloading'}: {self.n / self.total:.0%} of {self.total / 1e9:.2f} GB")
            return out

    return Reporting


def download(repo_id: str, progress=None, *, tokenizer_only: bool = False) -> str:
    """Download (or resume) `repo_id` into the HF cache with a progress bar; returns the local folder.
    `progress(text)`, when given, receives progress lines as well. `tokenizer_only`: just the files a
    remote engine's prompts are built with (model.loading.TOKENIZER_FILES)."""
    from model.loading import TOKENIZER_FILES

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        kwargs = {"tqdm_class": _progress_bar(progress)} if progress else {}
        return snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES if tokenizer_only else PATTERNS, **kwargs)
    except GatedRepoError as e:
        raise DownloadError(
            f"{repo_id} is gated. Open https://huggingface.co/{repo_id}, accept the Llama 3.2 Community License "
            "with your account, create a read token at https://huggingface.co/settings/tokens, then run "
            "`hf auth login` (or `huggingface-cli login`) or set HF_TOKEN, and try again.",
            title="License acceptance needed",
        ) from e
    except RepositoryNotFoundError as e:
        raise DownloadError(f"{repo_id} was not found on the Hugging Face Hub (or your token cannot see it).") from e
    except (HfHubHTTPError, OSError) as e:
        raise DownloadError(f"Downloading {repo_id} failed: {e}. Run the same command again to resume.") from e
