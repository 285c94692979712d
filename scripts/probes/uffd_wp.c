// What copy-on-write after a checkpoint's resume would cost with userfaultfd write-protect
// (issue 12; docs/BENCHMARKS.md, "Copy-on-write after the resume, probed"): protecting an
// epoch's 1,000 scattered pages one range each, protecting a 16 MiB range at once, and the round
// trip of a write fault on a protected anonymous page handled by another thread that copies the
// page (4 KiB) and removes the protection (for a guest, KVM's exit comes on top).
// Build and run (root, or vm.unprivileged_userfaultfd=1):
//   gcc -O2 -pthread -o /tmp/uffd_wp scripts/probes/uffd_wp.c && /tmp/uffd_wp
#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#define PAGES 4096
static long uffd; static char *mem; static char copybuf[4096];
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static void *handler(void *a){
  for(;;){ struct uffd_msg m; struct pollfd p={.fd=uffd,.events=POLLIN}; poll(&p,1,-1);
    if(read(uffd,&m,sizeof m)!=sizeof m) continue;
    if(m.event!=UFFD_EVENT_PAGEFAULT) continue;
    unsigned long addr=m.arg.pagefault.address & ~4095UL;
    memcpy(copybuf,(void*)addr,4096);
    struct uffdio_writeprotect wp={.range={.start=addr,.len=4096},.mode=0};
    if(ioctl(uffd,UFFDIO_WRITEPROTECT,&wp)) perror("unprotect");
  } return 0; }
int main(){
  uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  if(uffd<0){perror("userfaultfd");return 1;}
  struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_PAGEFAULT_FLAG_WP};
  if(ioctl(uffd,UFFDIO_API,&api)){perror("api");return 1;}
  mem=mmap(0,PAGES*4096L,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  for(long i=0;i<PAGES;i++) mem[i*4096]=1;
  struct uffdio_register r={.range={.start=(unsigned long)mem,.len=PAGES*4096L},.mode=UFFDIO_REGISTER_MODE_WP};
  if(ioctl(uffd,UFFDIO_REGISTER,&r)){perror("register");return 1;}
  pthread_t t; pthread_create(&t,0,handler,0);
  for(int round=0;round<5;round++){
    // protect 1,000 scattered pages one range each (what a checkpoint's dirty set would need)
    double t0=now();
    for(long i=0;i<1000;i++){ struct uffdio_writeprotect wp={.range={.start=(unsigned long)mem+((i*7)%PAGES)*4096,.len=4096},.mode=UFFDIO_WRITEPROTECT_MODE_WP}; ioctl(uffd,UFFDIO_WRITEPROTECT,&wp);}
    double t1=now();
    // one protect of the whole range
    struct uffdio_writeprotect all={.range={.start=(unsigned long)mem,.len=PAGES*4096L},.mode=UFFDIO_WRITEPROTECT_MODE_WP};
    ioctl(uffd,UFFDIO_WRITEPROTECT,&all);
    double t2=now();
    // writes to 1,000 protected pages: each a fault handled by the other thread
    double worst=0; double t3=now();
    for(long i=0;i<1000;i++){ double a=now(); mem[((i*7)%PAGES)*4096]++; double d=now()-a; if(d>worst)worst=d; }
    double t4=now();
    // writes again: unprotected now
    double t5=now(); for(long i=0;i<1000;i++) mem[((i*7)%PAGES)*4096]++; double t6=now();
    printf("round %d: protect 1,000 pages one by one %.0f us (%.2f each); whole 16 MiB range %.0f us; 1,000 faulting writes %.0f us (%.1f us each, worst %.0f); unprotected writes %.1f us\n",
      round,t1-t0,(t1-t0)/1000,t2-t1,t4-t3,(t4-t3)/1000,worst,t6-t5);
  }
  return 0;
}
