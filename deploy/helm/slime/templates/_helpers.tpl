{{/* Names, labels, addresses and the pod pieces every slime workload shares. */}}

{{- define "slime.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slime.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: "<fullname>-<component>", kept within the 52 characters a StatefulSet's
pod names and controller-revision hashes leave. */}}
{{- define "slime.componentName" -}}
{{- printf "%s-%s" (include "slime.fullname" .root) .component | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "slime.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slime.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "slime.labels" -}}
{{ include "slime.selectorLabels" . }}
app.kubernetes.io/part-of: slime
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The label selector the engine-pod sidecar lists engine pods with. */}}
{{- define "slime.engineSelector" -}}
{{- printf "app.kubernetes.io/instance=%s,app.kubernetes.io/component=rollout-engine" .Release.Name -}}
{{- end -}}

{{- define "slime.image" -}}
{{- $image := ternary .root.Values.gpuImage .root.Values.image (default false .gpu) -}}
image: {{ printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) | quote }}
imagePullPolicy: {{ $image.pullPolicy }}
{{- end -}}

{{- define "slime.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "slime.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "slime.trainerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- printf "%s-trainer" (include "slime.serviceAccountName" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "slime.secretName" -}}
{{- default (printf "%s-secrets" (include "slime.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "slime.sharedClaimName" -}}
{{- default (printf "%s-shared" (include "slime.fullname" .)) .Values.sharedVolume.existingClaim -}}
{{- end -}}

{{/* Service addresses, as the other services and the trainer reach them inside the cluster. */}}
{{- define "slime.routerUrl" -}}
{{- printf "http://%s:%d" (include "slime.componentName" (dict "root" . "component" "router")) (int .Values.router.port) -}}
{{- end -}}

{{- define "slime.rewardUrl" -}}
{{- printf "http://%s:%d" (include "slime.componentName" (dict "root" . "component" "reward-model")) (int .Values.rewardModel.port) -}}
{{- end -}}

{{- define "slime.rewardGrpcAddr" -}}
{{- printf "%s:%d" (include "slime.componentName" (dict "root" . "component" "reward-model")) (int .Values.rewardModel.grpcPort) -}}
{{- end -}}

{{- define "slime.bufferUrl" -}}
{{- printf "http://%s:%d" (include "slime.componentName" (dict "root" . "component" "rollout-buffer")) (int .Values.rolloutBuffer.port) -}}
{{- end -}}

{{/* Engine URLs the router registers at start: each StatefulSet pod by its stable DNS name, which is also the name
the engine-pod sidecar registers it under (hostname.subdomain.namespace.svc), or the external engines. */}}
{{- define "slime.engineUrls" -}}
{{- $urls := list -}}
{{- if .Values.engines.external -}}
{{- range .Values.engines.external -}}
{{- $urls = append $urls (ternary . (printf "http://%s" .) (hasPrefix "http" .)) -}}
{{- end -}}
{{- else -}}
{{- $sts := include "slime.componentName" (dict "root" . "component" "engine") -}}
{{- range $i := until (int .Values.engines.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:%d" $sts $i $sts $.Release.Namespace (int $.Values.engines.port)) -}}
{{- end -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{/* Environment every slime container gets: the log level and its own namespace. */}}
{{- define "slime.env" -}}
- name: SLIME_LOG_LEVEL
  value: {{ .Values.run.logLevel | quote }}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* Where Redis is, for the services that use it (router, rollout buffer, trainer). */}}
{{- define "slime.redisEnv" -}}
- name: SLIME_REDIS_URL
{{- if .Values.redis.bundled }}
  value: {{ printf "redis://%s:6379/0" (include "slime.componentName" (dict "root" . "component" "redis")) | quote }}
{{- else if .Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
  value: {{ required "redis.external.url (or redis.external.existingSecret) is required when redis.bundled is false" .Values.redis.external.url | quote }}
{{- end }}
{{- end -}}

{{- define "slime.authEnv" -}}
- name: SLIME_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "slime.secretName" . }}
      key: buffer-token
{{- end -}}

{{/* Flags every service takes: where Redis is, the run, and binding to the pod's addresses. */}}
{{- define "slime.serviceArgs" -}}
- --host
- 0.0.0.0
- --redis-url
- $(SLIME_REDIS_URL)
- --run-id
- {{ .Values.run.id | quote }}
- --log-level
- {{ .Values.run.logLevel | quote }}
{{- end -}}

{{- define "slime.httpProbes" -}}
livenessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{- define "slime.podAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* nodeSelector, tolerations, affinity of one component's values, and the pod-wide settings. */}}
{{- define "slime.podSpecCommon" -}}
{{- if .trainer -}}
serviceAccountName: {{ include "slime.trainerServiceAccountName" .root }}
{{- else -}}
serviceAccountName: {{ include "slime.serviceAccountName" .root }}
# Only the trainer's engine-pod sidecar talks to the Kubernetes API.
automountServiceAccountToken: false
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "slime.sharedVolume" -}}
{{- if .Values.sharedVolume.enabled -}}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "slime.sharedClaimName" . }}
{{- end -}}
{{- end -}}

{{- define "slime.sharedMount" -}}
{{- if .Values.sharedVolume.enabled -}}
- name: shared
  mountPath: {{ .Values.sharedVolume.mountPath }}
{{- end -}}
{{- end -}}
