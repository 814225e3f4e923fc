"""Stand-in of AUTOMATIC1111 stable-diffusion-webui v1.10.1's ``modules`` package, reduced to the
surface the DreamBooth LoRA extension uses (signatures transcribed from commit 82a973c). Test
support only: it is not the webui (see tests/webui_standin/README.md)."""
