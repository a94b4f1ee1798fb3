# slm-ui: the Streamlit playground. It only talks HTTP to the API, so it needs neither torch nor the model.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "streamlit>=1.35,<2" "httpx>=0.27" "pandas>=2.0"

FROM ${BASE}
RUN useradd --create-home --uid 1000 slm
COPY --from=build /opt/venv /opt/venv
COPY src/slm/ui/app.py /app/app.py
ENV PATH=/opt/venv/bin:$PATH \
    SLM_API_URL=http://api:8000 \
    SLM_UI_PORT=8501 \
    PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 8501
HEALTHCHECK --interval=5s --timeout=3s --start-period=15s --retries=12 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['SLM_UI_PORT'] + '/_stcore/health', timeout=2)"]
CMD ["sh", "-c", "exec streamlit run /app/app.py --server.port \"$SLM_UI_PORT\" --server.address 0.0.0.0 --server.headless true --browser.gatherUsageStats false"]
