{{/*
The key that signs every request from the API to serving (workers.signing): a Secret of its
own, referenced only by the API and the serving (RayService) pods. Keys: `current` and, during a
rotation, `previous` (serving accepts both; the API signs with `current`).
*/}}
{{- define "lorafleet.serveSigningSecretName" -}}
{{- .Values.serve.signing.existingSecret | default (printf "%s-serve-signing" (include "lorafleet.fullname" .)) }}
{{- end }}

{{- define "lorafleet.env.serveSigningKey" -}}
{{- if .Values.serve.enabled }}
- name: LORAFLEET_SERVE_SIGNING_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.serveSigningSecretName" . }}
      key: current
- name: LORAFLEET_SERVE_SIGNING_KEY_PREVIOUS
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.serveSigningSecretName" . }}
      key: previous
      optional: true
{{- end }}
{{- end }}
