{{/*
The KubeSchedulerConfiguration of tidal's kube-scheduler: what
tidal.scheduler_extender.schedconfig.scheduler_configuration returns with
profiles=SECOND_SCHEDULER (only tidal-scheduler: the extender applies to every profile, and a
default-scheduler profile here would be a second default scheduler) and
lease_namespace=<release namespace> (tests/test_chart.py compares the two). No kubeconfig:
in-cluster credentials, the pod's ServiceAccount tidal-scheduler.
*/}}
{{- define "tidal.schedulerConfiguration" -}}
{{- $ks := .Values.scheduler.kubeScheduler -}}
{{- $ext := .Values.scheduler.extender -}}
{{- $leader := include "tidal.schedulerLeaderElect" . | eq "true" -}}
{{- $sidecar := include "tidal.extenderSidecar" . | eq "true" -}}
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  qps: {{ int $ks.qps }}
  burst: {{ mul (int $ks.qps) 2 }}
leaderElection:
  leaderElect: {{ $leader }}
  {{- if $leader }}
  resourceName: tidal-scheduler
  resourceNamespace: {{ .Release.Namespace }}
  {{- end }}
percentageOfNodesToScore: {{ int $ks.percentageOfNodesToScore }}
profiles:
  - schedulerName: tidal-scheduler
extenders:
  {{- if $sidecar }}
  - urlPrefix: http://127.0.0.1:{{ int $ext.port }}
  {{- else }}
  - urlPrefix: https://tidal-extender.{{ .Release.Namespace }}.svc:{{ int $ext.port }}
  {{- end }}
    filterVerb: filter
    prioritizeVerb: prioritize
    weight: {{ int $ext.weight }}
    nodeCacheCapable: true
    enableHTTPS: {{ not $sidecar }}
    httpTimeout: {{ $ext.timeout }}
    managedResources:
      - name: nvidia.com/gpu
        ignoredByScheduler: false
    # Not ignorable: without the extender a GPU pod would get GPUs no one chose.
    ignorable: false
    preemptVerb: preempt
    bindVerb: bind
    {{- if not $sidecar }}
    tlsConfig:
      caFile: /etc/tidal/extender-client/ca.crt
      certFile: /etc/tidal/extender-client/tls.crt
      keyFile: /etc/tidal/extender-client/tls.key
    {{- end }}
{{- end -}}
