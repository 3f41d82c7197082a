/* The shared-memory put's copies, measured without kvcache (benches/results/README.md,
 * "Shared-memory puts"): 2048 copies of 1 MiB from a 256 MiB source into a 256 MiB pool,
 * (1) one memcpy, (2) two memcpys through a 1 MiB staging buffer that stays in cache (today's
 * client copy plus the node's), (3) vmsplice of the source into a 1 MiB pipe while a second
 * thread reads it into the pool (one copy, and the writer never maps the pool).
 *
 *   gcc -O2 -o /tmp/shm_copy_paths benches/shm_copy_paths.c -lpthread && /tmp/shm_copy_paths
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#define SRC (256UL<<20)
#define BLK (1UL<<20)
#define N 2048
static char *src,*pool,*staging;
static int p[2];
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void* reader(void*a){ size_t total=(size_t)N*BLK; size_t got=0; while(got<total){ size_t off=got%SRC; ssize_t n=read(p[0],pool+off, BLK-(got%BLK)); if(n<=0){perror("read");exit(1);} got+=n;} return 0;}
int main(int argc,char**argv){
  src=mmap(0,SRC,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE,-1,0);
  pool=mmap(0,SRC,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE,-1,0);
  staging=mmap(0,BLK*4,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE,-1,0);
  memset(src,1,SRC);
  double t=now();
  for(int i=0;i<N;i++){ memcpy(pool+(i*BLK)%SRC, src+((i*7)*BLK)%SRC, BLK);}  
  double one=now()-t; printf("1 copy: %.2f GB/s\n", N*BLK/one/1e9);
  t=now();
  for(int i=0;i<N;i++){ memcpy(staging, src+((i*7)*BLK)%SRC, BLK); memcpy(pool+(i*BLK)%SRC, staging, BLK);}  
  double two=now()-t; printf("2 copies seq: %.2f GB/s\n", N*BLK/two/1e9);
  pipe(p); int sz=fcntl(p[1],F_SETPIPE_SZ,1<<20); printf("pipe %d\n",sz);
  pthread_t th; pthread_create(&th,0,reader,0);
  t=now();
  for(int i=0;i<N;i++){ struct iovec v={src+((i*7)*BLK)%SRC,BLK}; while(v.iov_len){ ssize_t n=vmsplice(p[1],&v,1,0); if(n<0){perror("vmsplice");return 1;} v.iov_base=(char*)v.iov_base+n; v.iov_len-=n;} }
  pthread_join(th,0);
  double vs=now()-t; printf("vmsplice+read: %.2f GB/s\n", N*BLK/vs/1e9);
}
