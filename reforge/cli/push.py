"""`reforge push OUT REPO_ID`: upload a finished checkpoint folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click

from reforge.cli.options import output_options


@click.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option(
    "--public", is_flag=True, help="Create the repo public (default: private). An existing repo keeps its visibility."
)
@click.option(
    "-r",
    "--revision",
    default=None,
    metavar="BRANCH",
    help="Branch to commit to; created from main when missing.  [default: main]",
)
@click.option("-m", "--message", default=None, help="Commit message.  [default: Upload FOLDER with reforge VERSION]")
@click.option(
    "--token",
    envvar="HF_TOKEN",
    default=None,
    show_envvar=True,
    help="Hugging Face token with write access (default: the one `hf auth login` saved). Never printed.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Run the checks a push runs (incl. `reforge verify`) and list the files and bytes; send nothing.",
)
@click.option(
    "--skip-verify",
    is_flag=True,
    help="Skip the full `reforge verify` checks (the quick completeness checks always run).",
)
@output_options
def push_cmd(
    folder: str,
    repo_id: str,
    public: bool,
    revision: str | None,
    message: str | None,
    token: str | None,
    dry_run: bool,
    skip_verify: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Upload a verified checkpoint folder to the Hugging Face Hub.

    The folder must be complete: no leftover temporary or lock files, every shard its index names present and
    whole, config next to the weights; unless --skip-verify, it must also pass `reforge verify`. Nothing is sent
    otherwise. The repo is created private unless --public. All files go in one commit; rerunning after an
    interruption is safe (files already on the Hub with the same content are skipped). Prints the commit URL.

    \b
    Examples:
      reforge push scifact-repllama/ me/repllama-scifact
      reforge push scifact-repllama/ me/repllama-scifact --dry-run
      reforge push scifact-repllama/ me/repllama-scifact --revision alpha-0.3 --public
      HF_TOKEN=hf_... reforge push out/ my-org/e5-mistral-nfcorpus --json
    """
    from reforge import publish
    from reforge.cli import output

    target, at_revision = _split_repo(repo_id)
    if at_revision and revision and at_revision != revision:
        raise click.UsageError(
            f"REPO_ID names revision {at_revision!r} and --revision names {revision!r}; "
            "give the branch once, with --revision."
        )
    revision = revision or at_revision
    if dry_run:
        return _dry_run(folder, target, revision, not public, as_json, verify=not skip_verify)
    if not (Path(folder) / "README.md").is_file():
        output.warn("no README.md: the repo will have no model card (reforge merge and train write one).")
    with output.progress_bar("Uploading", unit="bytes", quiet=quiet or as_json) as progress:
        url = publish.push_folder(
            folder,
            target,
            private=not public,
            token=token,
            revision=revision,
            commit_message=message,
            progress=progress,
            verify=not skip_verify,
        )
    plan = publish.upload_plan(folder)
    if as_json:
        output.print_json(
            {
                "repo_id": target,
                "revision": revision or "main",
                "private_requested": not public,
                "commit_url": url,
                "files": len(plan),
                "bytes": sum(size for _, size in plan),
            }
        )
    else:
        click.echo(url)


def _split_repo(repo_id: str) -> tuple[str, str | None]:
    from reforge.io import hub

    if not hub.looks_like_repo_id(repo_id):
        raise click.BadParameter(
            f"{repo_id!r} is not a Hub repo id; write owner/name, e.g. me/repllama-scifact.", param_hint="REPO_ID"
        )
    return hub.parse_ref(repo_id)


def _dry_run(folder: str, repo_id: str, revision: str | None, private: bool, as_json: bool, *, verify: bool) -> None:
    from reforge import publish
    from reforge.cli import output
    from reforge.errors import VerificationError, short_path

    failures = publish.push_failures(folder, verify=verify)  # what a real push checks, no less
    if failures:
        raise VerificationError(
            f"{short_path(folder)} is not ready to push: {failures[0]}"
            + (f" (and {len(failures) - 1} more)." if len(failures) > 1 else "."),
            hint="Rerun the command that wrote it, then `reforge verify` it.",
            path=folder,
            failures=failures,
        )
    plan = publish.upload_plan(folder)
    total = sum(size for _, size in plan)
    if as_json:
        output.print_json(
            {
                "dry_run": True,
                "repo_id": repo_id,
                "revision": revision or "main",
                "private": private,
                "files": [{"path": p, "bytes": s} for p, s in plan],
                "total_bytes": total,
            }
        )
        return
    width = max(len(p) for p, _ in plan)
    for path, size in plan:
        click.echo(f"{path:<{width}}  {size:>14,}")
    click.echo(
        f"{len(plan)} files, {total:,} bytes -> {repo_id}@{revision or 'main'} "
        f"({'private' if private else 'public'} if created). Nothing was sent (--dry-run)."
    )
    if not any(p == "README.md" for p, _ in plan):
        output.warn("no README.md: the repo will have no model card (reforge merge and train write one).")
